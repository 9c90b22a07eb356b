//! Images of chat requests: OpenAI `image_url` parts carrying `data:` URLs (PNG or JPEG,
//! base64), decoded and preprocessed for the LLaVA model's tower. The server fetches nothing
//! from the network, so http(s) URLs are refused.

use base64::Engine;
use candle_core::{Device, Tensor};

use super::api::ApiError;
use super::prompt::ImagePart;
use crate::data::image::ClipPreprocess;

/// What a server that takes images needs to know about them.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInput {
    /// The tower's preprocessing.
    pub preprocess: ClipPreprocess,
    /// Rows an image takes in the context (its placeholder is one of them).
    pub tokens: usize,
}

/// The decoded RGB image of an `image_url` part; every failure is a 400 naming the part.
pub fn decode_image(part: &ImagePart) -> Result<image::RgbImage, ApiError> {
    let at = &part.param;
    let bad = |message: String| ApiError::invalid(Some(&format!("{at}.image_url.url")), message);
    let url = part.url.trim();
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Err(bad(format!(
            "{at}: image URLs are not fetched (this server makes no network requests); send \
             the image inline as a data URL (data:image/png;base64,... or data:image/jpeg;base64,...)"
        )));
    }
    let Some(rest) = url.strip_prefix("data:") else {
        let scheme: String = url.chars().take_while(|&c| c != ':').take(20).collect();
        return Err(bad(format!(
            "{at}: unsupported image URL (scheme {scheme:?}); send a data URL \
             (data:image/png;base64,...)"
        )));
    };
    let (header, payload) = rest
        .split_once(',')
        .ok_or_else(|| bad(format!("{at}: a data URL without a `,` before its data")))?;
    let mut fields = header.split(';');
    let mime = fields.next().unwrap_or_default().to_ascii_lowercase();
    let format = match mime.as_str() {
        "image/png" => image::ImageFormat::Png,
        "image/jpeg" | "image/jpg" => image::ImageFormat::Jpeg,
        other => {
            return Err(bad(format!(
                "{at}: image type {other:?} is not supported; send image/png or image/jpeg"
            )))
        }
    };
    if !fields.any(|f| f.eq_ignore_ascii_case("base64")) {
        return Err(bad(format!(
            "{at}: the data URL is not base64-encoded (expected data:{mime};base64,...)"
        )));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| bad(format!("{at}: the data URL's base64 is invalid: {e}")))?;
    let img = image::load_from_memory_with_format(&bytes, format)
        .map_err(|e| bad(format!("{at}: not a readable {mime} image: {e}")))?;
    Ok(img.to_rgb8())
}

/// The part's image as the tower's input `[3, S, S]` (f32, CPU).
pub fn load_image(part: &ImagePart, input: &ImageInput) -> Result<Tensor, ApiError> {
    let img = decode_image(part)?;
    input.preprocess.apply(&img, &Device::Cpu).map_err(|e| {
        ApiError::invalid(
            Some(&part.param),
            format!("{}: preprocessing the image failed: {e:#}", part.param),
        )
    })
}
