//! `ftrun serve --llava`: chat completions with an image as an OpenAI `image_url` part (a
//! base64 data URL) answer as `ftrun chat --llava --image` does; image URLs, a second image,
//! undecodable images and images sent to a text-only server are 400s naming the part.

mod llava_export_support;
mod serve_support;

use base64::Engine;
use serde_json::{json, Value};
use serve_support::{chat, content, ServeProcess};
use std::path::Path;

const QUESTION: &str = "What colour is the shape?";

fn data_url(path: &Path, mime: &str) -> String {
    let bytes = std::fs::read(path).unwrap();
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn image_part(url: &str) -> Value {
    json!({"type": "image_url", "image_url": {"url": url}})
}

fn ask(image: Value) -> Value {
    json!({
        "messages": [{"role": "user", "content": [image, {"type": "text", "text": QUESTION}]}],
        "temperature": 0,
        "max_tokens": 8,
    })
}

#[test]
fn images_in_the_api_answer_as_chat_does_and_bad_images_are_400s() {
    let t = llava_export_support::train_and_export(20, 40, false);
    let (llm, clip) = (t.tiny.llm.to_str().unwrap(), t.tiny.clip.to_str().unwrap());
    let export = t.export.to_str().unwrap();
    let server = ServeProcess::start(&[
        llm,
        "--llava",
        export,
        "--visual-encoder",
        clip,
        "--template",
        "internlm2_chat",
    ]);
    let chat_answer = |image: &Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ftrun"))
            .args([
                "chat",
                llm,
                "--llava",
                export,
                "--visual-encoder",
                clip,
                "--image",
            ])
            .arg(image)
            .args([
                "--template",
                "internlm2_chat",
                "--prompt",
                QUESTION,
                "--greedy",
            ])
            .args(["--max-new-tokens", "8", "--device", "cpu"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    for (file, colour) in [("red_square.png", "red"), ("blue_circle.png", "blue")] {
        let image = t.tiny.images.join(file);
        let r = chat(
            server.addr,
            &ask(image_part(&data_url(&image, "image/png"))),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let answer = content(&r);
        assert_eq!(answer.trim(), chat_answer(&image), "{file}: API vs chat");
        assert!(answer.contains(colour), "{file}: {answer:?}");
        // The image's 4 rows count in the prompt (its placeholder is one token).
        let plain = chat(
            server.addr,
            &json!({"messages": [{"role": "user", "content": format!("<image>\n{QUESTION}")}],
                    "max_tokens": 1}),
        );
        let with_image = r.json()["usage"]["prompt_tokens"].as_u64().unwrap();
        let text_only = plain.json()["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(
            with_image > 4 && with_image < text_only + 4,
            "{with_image} vs {text_only}"
        );
    }

    let red = t.tiny.images.join("red_square.png");
    let png = data_url(&red, "image/png");
    let refused = |body: &Value| {
        let r = chat(server.addr, body);
        assert_eq!(r.status, 400, "{}", r.text());
        let e = r.json()["error"].clone();
        (
            e["param"].as_str().unwrap_or_default().to_string(),
            e["message"].as_str().unwrap().to_string(),
        )
    };
    let (param, message) = refused(&ask(image_part("https://example.com/cat.png")));
    assert_eq!(param, "messages[0].content[0].image_url.url");
    assert!(message.contains("not fetched"), "{message}");
    let (param, message) = refused(&json!({"messages": [{"role": "user", "content": [
        image_part(&png), image_part(&png), {"type": "text", "text": QUESTION}]}]}));
    assert_eq!(param, "messages[0].content[1]");
    assert!(message.contains("second image"), "{message}");
    let (_, message) = refused(&ask(image_part(&png.replace("image/png", "image/gif"))));
    assert!(message.contains("image/gif"), "{message}");
    let (_, message) = refused(&ask(image_part("data:image/png;base64,@@@")));
    assert!(message.contains("base64"), "{message}");
    let (_, message) = refused(&ask(image_part(&png.replace("image/png", "image/jpeg"))));
    assert!(message.contains("not a readable image/jpeg"), "{message}");

    // A text-only server refuses images by name.
    let text_server = ServeProcess::start(&[llm, "--template", "internlm2_chat"]);
    let r = chat(text_server.addr, &ask(image_part(&png)));
    assert_eq!(r.status, 400, "{}", r.text());
    let e = &r.json()["error"];
    assert_eq!(e["param"], "messages[0].content[0]");
    assert!(e["message"].as_str().unwrap().contains("text-only"), "{e}");
}
