//! `ftrun serve`: an OpenAI-compatible chat API (`POST /v1/chat/completions`, `GET
//! /v1/models`) and a web chat page at `/` that can show the fine-tuned model next to its base.
//!
//! Layout: `api` is the wire format, `prompt` turns messages into the template's tokens,
//! `worker` is the one thread that owns the model(s) and batches generation, this file is the
//! HTTP side (axum on a small tokio runtime): it validates, tokenizes, queues a `Job` and
//! turns the worker's events into a JSON answer or an SSE stream.

pub mod api;
pub mod image;
pub mod prompt;
pub mod worker;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use anyhow::{anyhow, Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::infer::{ChatFormat, FinishReason, GenConfig, TextCodec};
use api::{ApiError, ChatRequest, CompletionMeta, Usage};
use image::ImageInput;
use prompt::Conversation;
use worker::{Event, Job, ServedModel, Stats, StatsSnapshot};

/// Largest request body: room for a base64 photo (the default of 2 MB is not).
const MAX_BODY_BYTES: usize = 32 << 20;

/// The web page, embedded in the binary.
const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const STYLE_CSS: &str = include_str!("web/style.css");

/// A model the server answers as: its API id and what the web page calls it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub id: String,
    pub label: String,
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// When set, every `/v1` request needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// The template prompts are laid out with (the `plain` template for none).
    pub format: ChatFormat,
    /// The models' context length: prompt plus answer must fit.
    pub max_context: usize,
    /// Most sequences generated together; more requests wait in the queue.
    pub max_batch: usize,
}

/// What the HTTP handlers share.
struct AppState {
    jobs: mpsc::Sender<Job>,
    codec: Arc<dyn TextCodec + Send + Sync>,
    models: Vec<ModelInfo>,
    options: ServeOptions,
    /// Set when the model takes images (LLaVA).
    images: Option<ImageInput>,
    next_id: AtomicU64,
}

/// A running server: the HTTP thread and the generation worker.
pub struct Server {
    addr: SocketAddr,
    stats: Arc<Stats>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    http: Option<JoinHandle<Result<()>>>,
    worker: Option<JoinHandle<()>>,
}

impl Server {
    /// Serve `models` (the first answers requests that name no model; a second one is the
    /// base model of the compare view) on `listener`. Returns once the server accepts
    /// connections.
    pub fn start<M, C>(
        listener: std::net::TcpListener,
        models: Vec<(ModelInfo, M)>,
        codec: C,
        options: ServeOptions,
    ) -> Result<Server>
    where
        M: ServedModel + Send + 'static,
        C: TextCodec + Send + Sync + 'static,
    {
        Self::start_with_images(listener, models, codec, options, None)
    }

    /// [`Server::start`] for models that take images (`images` set: LLaVA): requests may
    /// carry one `image_url` part.
    pub fn start_with_images<M, C>(
        listener: std::net::TcpListener,
        models: Vec<(ModelInfo, M)>,
        codec: C,
        options: ServeOptions,
        images: Option<ImageInput>,
    ) -> Result<Server>
    where
        M: ServedModel + Send + 'static,
        C: TextCodec + Send + Sync + 'static,
    {
        if models.is_empty() {
            return Err(anyhow!("serve needs at least one model"));
        }
        let addr = listener
            .local_addr()
            .context("reading the listen address")?;
        listener
            .set_nonblocking(true)
            .context("making the listener non-blocking")?;
        let (infos, models): (Vec<ModelInfo>, Vec<M>) = models.into_iter().unzip();
        let codec = Arc::new(codec);
        let stats = Arc::new(Stats::default());
        let (jobs, job_queue) = mpsc::channel::<Job>();

        let worker = {
            let (codec, stats, max_batch) = (codec.clone(), stats.clone(), options.max_batch);
            std::thread::Builder::new()
                .name("ftrun-serve-worker".into())
                .spawn(move || worker::run(&models, &*codec, job_queue, max_batch, &stats))
                .context("starting the generation worker")?
        };
        let state = Arc::new(AppState {
            jobs,
            codec,
            models: infos,
            options,
            images,
            next_id: AtomicU64::new(0),
        });
        let (shutdown, shutdown_signal) = tokio::sync::oneshot::channel::<()>();
        let http = std::thread::Builder::new()
            .name("ftrun-serve-http".into())
            .spawn(move || -> Result<()> {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .context("starting the HTTP runtime")?;
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    axum::serve(listener, router(state))
                        .with_graceful_shutdown(async {
                            let _ = shutdown_signal.await;
                        })
                        .await
                        .context("serving HTTP")
                })
            })
            .context("starting the HTTP thread")?;
        Ok(Server {
            addr,
            stats,
            shutdown: Some(shutdown),
            http: Some(http),
            worker: Some(worker),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The worker's counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Block until the server stops (it runs until the process ends or `shutdown`).
    pub fn wait(mut self) -> Result<()> {
        let http = self.http.take().context("the server was already stopped")?;
        http.join()
            .map_err(|_| anyhow!("the HTTP thread panicked"))??;
        Ok(())
    }

    /// Stop accepting requests, let open ones end, and stop the worker.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> Result<()> {
        if let Some(signal) = self.shutdown.take() {
            let _ = signal.send(());
        }
        if let Some(http) = self.http.take() {
            http.join()
                .map_err(|_| anyhow!("the HTTP thread panicked"))??;
        }
        // The HTTP side dropped the job queue's sender: the worker ends its batch and exits.
        if let Some(worker) = self.worker.take() {
            worker
                .join()
                .map_err(|_| anyhow!("the generation worker panicked"))?;
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("serve: {e:#}");
        }
    }
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route("/ui/config", get(ui_config))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|uri: axum::http::Uri| async move {
            error_response(&ApiError::not_found(
                format!("there is no route {uri}: the API has POST /v1/chat/completions and GET /v1/models"),
                None,
            ))
        })
        .method_not_allowed_fallback(|method: axum::http::Method, uri: axum::http::Uri| async move {
            error_response(&ApiError::status(
                405,
                format!("{method} is not allowed on {uri}"),
            ))
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

fn asset(content_type: &'static str, text: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], text).into_response()
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    json_response(status, &e.body())
}

/// The API key check: `Authorization: Bearer <key>` when the server has a key.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.options.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim());
    match given {
        None => Err(ApiError::unauthorized(
            "no API key given: this server was started with --api-key; send the header \
             `Authorization: Bearer <key>`",
        )),
        Some(given) if constant_time_eq(given.as_bytes(), key.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::unauthorized("incorrect API key")),
    }
}

/// Byte comparison whose time does not depend on where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What the page needs to draw itself (no secrets: served without the key).
async fn ui_config(State(state): State<Arc<AppState>>) -> Response {
    let models: Vec<Value> = state
        .models
        .iter()
        .map(|m| json!({"id": m.id, "label": m.label}))
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "models": models,
            "compare": state.models.len() > 1,
            "auth_required": state.options.api_key.is_some(),
            "max_context": state.options.max_context,
        }),
    )
}

fn model_object(m: &ModelInfo) -> Value {
    json!({"id": m.id, "object": "model", "created": 0, "owned_by": "ftrun"})
}

async fn list_models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return error_response(&e);
    }
    let data: Vec<Value> = state.models.iter().map(model_object).collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

async fn get_model(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return error_response(&e);
    }
    match state.models.iter().find(|m| m.id == id) {
        Some(m) => json_response(StatusCode::OK, &model_object(m)),
        None => error_response(&unknown_model(&state, &id)),
    }
}

fn unknown_model(state: &AppState, id: &str) -> ApiError {
    let ids: Vec<&str> = state.models.iter().map(|m| m.id.as_str()).collect();
    ApiError::not_found(
        format!(
            "the model `{id}` does not exist; this server has: {}",
            ids.join(", ")
        ),
        Some("model_not_found"),
    )
}

/// A validated request, ready to queue.
struct Prepared {
    job: Job,
    events: UnboundedReceiver<Event>,
    meta: CompletionMeta,
    prompt_tokens: usize,
    stream: bool,
    include_usage: bool,
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let prepared = match prepare(&state, &headers, body) {
        Ok(p) => p,
        Err(e) => return error_response(&e),
    };
    let Prepared {
        job,
        events,
        meta,
        prompt_tokens,
        stream,
        include_usage,
    } = prepared;
    if state.jobs.send(job).is_err() {
        return error_response(&ApiError::server("the generation worker has stopped"));
    }
    if stream {
        sse_response(events, meta, prompt_tokens, include_usage)
    } else {
        collect_answer(events, meta, prompt_tokens).await
    }
}

/// Check the key and the request, lay out and measure the prompt, build the job.
fn prepare(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Prepared, ApiError> {
    authorize(state, headers)?;
    let body = body.map_err(|r| ApiError::status(r.status().as_u16(), r.body_text()))?;
    let request = ChatRequest::parse(&body)?;
    request.check_settings()?;
    let model = match &request.model {
        None => 0,
        Some(id) => state
            .models
            .iter()
            .position(|m| &m.id == id)
            .ok_or_else(|| unknown_model(state, id))?,
    };
    let conversation = Conversation::from_messages(&request.messages)?;
    let image = match (&conversation.image, &state.images) {
        (None, _) => None,
        (Some(part), None) => {
            return Err(ApiError::invalid(
                Some(&part.param),
                format!(
                    "{} is an image, but this server's model is text-only (serve a LLaVA model \
                     with --llava to send images)",
                    part.param
                ),
            ))
        }
        (Some(part), Some(input)) => Some(image::load_image(part, input)?),
    };
    let format = &state.options.format;
    let prompt = conversation
        .encode(format, state.codec.as_ref())
        .map_err(|e| ApiError::server(format!("tokenizing the prompt failed: {e:#}")))?;
    // Positions the prompt takes: the image placeholder stands for the image's rows.
    let prompt_len = match (&image, &state.images) {
        (Some(_), Some(input)) => prompt.len() - 1 + input.tokens,
        _ => prompt.len(),
    };

    let context = state.options.max_context;
    let limit = request.token_limit().map(|n| n as usize);
    let too_long = match limit {
        Some(n) => prompt_len.saturating_add(n) > context,
        None => prompt_len >= context,
    };
    if too_long {
        let asked = match limit {
            Some(n) => format!(
                "you requested {} tokens ({prompt_len} in the messages, {n} in the completion)",
                prompt_len.saturating_add(n),
            ),
            None => format!("your messages resulted in {prompt_len} tokens"),
        };
        return Err(ApiError::invalid(
            Some("messages"),
            format!(
                "this model's maximum context length is {context} tokens, however {asked}; \
                 shorten the messages or lower max_tokens"
            ),
        )
        .with_code("context_length_exceeded"));
    }

    let temperature = request.temperature.unwrap_or(1.0);
    let top_p = request.top_p.unwrap_or(1.0);
    // top_p = 0 keeps only the most likely token: greedy.
    let greedy = temperature == 0.0 || top_p == 0.0;
    let gen = GenConfig {
        max_new_tokens: limit.unwrap_or(context - prompt_len),
        temperature: if greedy { 0.0 } else { temperature },
        top_p: if greedy { 1.0 } else { top_p },
        top_k: 0,
        repetition_penalty: 1.0,
        seed: request.seed,
        do_sample: !greedy,
    };
    let mut stop_words = format.all_stop_words();
    for word in request.stop_words() {
        if !stop_words.contains(&word) {
            stop_words.push(word);
        }
    }
    let (events_tx, events) = unbounded_channel();
    let n = state.next_id.fetch_add(1, Ordering::SeqCst);
    let meta = CompletionMeta {
        id: format!("chatcmpl-{:08x}{n:06}", rand::random::<u32>()),
        created: chrono::Utc::now().timestamp(),
        model: state.models[model].id.clone(),
    };
    Ok(Prepared {
        prompt_tokens: prompt_len,
        job: Job {
            model,
            prompt,
            image,
            gen,
            stop_words,
            events: events_tx,
        },
        events,
        meta,
        stream: request.stream.unwrap_or(false),
        include_usage: request.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// OpenAI's name of a finish reason.
fn finish_reason_name(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
}

/// Wait for the whole answer. If the client goes away meanwhile, hyper drops this future and
/// with it `events`, which cancels the generation.
async fn collect_answer(
    mut events: UnboundedReceiver<Event>,
    meta: CompletionMeta,
    prompt_tokens: usize,
) -> Response {
    let mut content = String::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Delta(text) => content += &text,
            Event::Done {
                finish_reason,
                completion_tokens,
            } => {
                let usage = Usage::new(prompt_tokens, completion_tokens);
                let body = meta.completion(&content, finish_reason_name(finish_reason), usage);
                return json_response(StatusCode::OK, &body);
            }
            Event::Failed(message) => {
                return error_response(&ApiError::server(format!("generation failed: {message}")))
            }
        }
    }
    error_response(&ApiError::server(
        "the generation worker stopped before the answer was complete",
    ))
}

/// One SSE event.
fn sse_data(value: &Value) -> String {
    format!("data: {value}\n\n")
}

/// Stream the answer as OpenAI chunks: the role, one chunk per text delta, the finish
/// reason, optionally the usage, then `data: [DONE]`. Dropping the body (the client went
/// away) drops `events`, which cancels the generation.
fn sse_response(
    events: UnboundedReceiver<Event>,
    meta: CompletionMeta,
    prompt_tokens: usize,
    include_usage: bool,
) -> Response {
    let first = sse_data(&meta.chunk(json!({"role": "assistant", "content": ""}), None));
    // State: the receiver, the first frame still to send, the metadata; None once ended.
    let initial = Some((events, Some(first), meta));
    let stream = futures_util::stream::unfold(initial, move |state| async move {
        let (mut events, first, meta) = state?;
        if let Some(frame) = first {
            return Some((
                Ok::<_, Infallible>(Bytes::from(frame)),
                Some((events, None, meta)),
            ));
        }
        let frame = match events.recv().await {
            Some(Event::Delta(text)) => {
                let frame = sse_data(&meta.chunk(json!({"content": text}), None));
                return Some((Ok(Bytes::from(frame)), Some((events, None, meta))));
            }
            Some(Event::Done {
                finish_reason,
                completion_tokens,
            }) => {
                let reason = finish_reason_name(finish_reason);
                let mut frame = sse_data(&meta.chunk(json!({}), Some(reason)));
                if include_usage {
                    let usage = Usage::new(prompt_tokens, completion_tokens);
                    frame += &sse_data(&meta.usage_chunk(usage));
                }
                frame + "data: [DONE]\n\n"
            }
            Some(Event::Failed(message)) => {
                sse_data(&ApiError::server(format!("generation failed: {message}")).body())
            }
            None => sse_data(
                &ApiError::server("the generation worker stopped before the answer was complete")
                    .body(),
            ),
        };
        // The last frame; the next poll ends the stream.
        Some((Ok(Bytes::from(frame)), None))
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
