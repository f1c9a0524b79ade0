//! The translation gateway, `/node/translation`: sends jobs to the configured backend, keeps
//! the backend's readiness (a periodic probe) and its measured throughput (for estimates).
//!
//! A job runs as a future of this actor, so the actor stays free while the backend works; the
//! per-client limits (slots, queue, rate) are taken before a job gets here, by the caller, from
//! the client's registry actor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorFutureExt, AsyncContext, Context, Handler, Message, ResponseActFuture, WrapFuture,
};
use serde::Serialize;

use super::backend::{Backend, BackendConfig, BackendError};
use super::markdown::{plan, system_prompt};
use crate::registry::JobPermit;
use crate::supervision::Managed;

/// How the gateway runs.
#[derive(Clone, Debug)]
pub struct GatewaySettings {
    /// `None`: no backend configured; translations are refused as unavailable.
    pub backend: Option<BackendConfig>,
    pub probe_interval: Duration,
    /// Most prose characters sent in one backend request.
    pub chunk_chars: usize,
}

/// What to translate.
#[derive(Clone, Debug)]
pub enum Source {
    /// A title: one line, no markdown handling.
    Title(String),
    /// A markdown document (its title translated as a title).
    Document { title: String, markdown: String },
    /// A piece of a streamed document, handled as markdown.
    Chunk(String),
}

impl Source {
    fn chars(&self) -> usize {
        match self {
            Source::Title(t) | Source::Chunk(t) => t.chars().count(),
            Source::Document { title, markdown } => {
                title.chars().count() + markdown.chars().count()
            }
        }
    }
}

/// A translation job.
#[derive(Message)]
#[rtype(result = "Result<Translated, JobError>")]
pub struct Translate {
    pub job_id: String,
    pub source: Source,
    pub source_language: String,
    pub target_language: String,
    /// What is left of the caller's deadline.
    pub deadline: Duration,
    /// The client's job slot, held until the job ends (even if its caller left earlier).
    pub slot: Option<Arc<JobPermit>>,
}

/// A job's result.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Translated {
    pub title: String,
    pub markdown: String,
    /// Summed over the backend requests, as the backend reported them.
    pub tokens: u64,
    /// Time spent in backend requests.
    pub inference: Duration,
}

/// Why a job failed; every message names the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobError {
    /// No backend configured, or it cannot be reached / answered with an error.
    Unavailable(String),
    /// The backend did not finish before the deadline.
    Timeout(String),
    /// The backend's answer could not be used (a lost placeholder, malformed JSON).
    Failed(String),
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unavailable(m) | Self::Timeout(m) | Self::Failed(m) => f.write_str(m),
        }
    }
}

/// Whether a title can be translated now, and how long it would take.
#[derive(Message)]
#[rtype(result = "TitleCheck")]
pub struct CheckTitle {
    pub title: String,
}

/// [`CheckTitle`]'s answer.
#[derive(Clone, Debug, PartialEq, actix::MessageResponse)]
pub struct TitleCheck {
    pub ready: bool,
    pub message: String,
    pub estimated_seconds: u32,
}

crate::handles!(TranslationGateway: Translate, CheckTitle);

/// Recent backend speed: exponentially weighted, so it follows the model's load.
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct Throughput {
    /// Characters translated per second of backend time.
    chars_per_second: f64,
    /// Fixed cost of one request (queueing, prompt processing), in seconds.
    request_seconds: f64,
    samples: u64,
}

impl Throughput {
    const WEIGHT: f64 = 0.2;

    fn record(&mut self, chars: usize, requests: u32, elapsed: Duration) {
        if requests == 0 || elapsed.is_zero() {
            return;
        }
        let secs = elapsed.as_secs_f64();
        let rate = chars as f64 / secs;
        let per_request = secs / f64::from(requests);
        if self.samples == 0 {
            self.chars_per_second = rate;
            self.request_seconds = per_request;
        } else {
            self.chars_per_second += Self::WEIGHT * (rate - self.chars_per_second);
            self.request_seconds += Self::WEIGHT * (per_request - self.request_seconds);
        }
        self.samples += 1;
    }

    /// Seconds to translate `chars` in one request; `None` before any measurement.
    fn estimate(&self, chars: usize) -> Option<f64> {
        (self.samples > 0 && self.chars_per_second > 0.0)
            .then(|| (chars as f64 / self.chars_per_second).max(self.request_seconds))
    }
}

/// The gateway actor.
pub struct TranslationGateway {
    settings: Arc<GatewaySettings>,
    backend: Option<Backend>,
    /// The last probe's outcome (`None`: none finished yet).
    probe: Option<Result<Vec<String>, String>>,
    probed_at: Option<Instant>,
    probing: bool,
    throughput: Throughput,
    jobs: u64,
    failures: u64,
}

impl TranslationGateway {
    /// A gateway for `settings`; an invalid backend configuration is an error (checked at
    /// start-up, before the node serves).
    pub fn new(settings: Arc<GatewaySettings>) -> Result<Self, String> {
        let backend = settings.backend.clone().map(Backend::new).transpose()?;
        Ok(Self {
            settings,
            backend,
            probe: None,
            probed_at: None,
            probing: false,
            throughput: Throughput::default(),
            jobs: 0,
            failures: 0,
        })
    }

    fn probe(&mut self, ctx: &mut Context<Self>) {
        let Some(backend) = self.backend.clone() else {
            return;
        };
        if self.probing {
            return;
        }
        self.probing = true;
        ctx.spawn(
            async move { backend.probe().await }
                .into_actor(self)
                .map(|res, act, _| {
                    act.probing = false;
                    act.probed_at = Some(Instant::now());
                    act.probe = Some(res.map_err(|e| e.to_string()));
                }),
        );
    }
}

impl Actor for TranslationGateway {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.probe(ctx);
        ctx.run_interval(self.settings.probe_interval, |act, ctx| act.probe(ctx));
    }
}

impl Managed for TranslationGateway {
    const KIND: &'static str = "translation-gateway";

    fn dump_state(&self) -> serde_json::Value {
        serde_json::json!({
            "backend": self.settings.backend.as_ref().map(|b| serde_json::json!({"url": crate::redact::url_credentials(&b.url), "model": b.model})),
            "ready": matches!(self.probe, Some(Ok(_))),
            "probe": match &self.probe {
                None => serde_json::Value::Null,
                Some(Ok(models)) => serde_json::json!({"models": models}),
                Some(Err(e)) => serde_json::json!({"error": e}),
            },
            "probed_ms_ago": self.probed_at.map(|t| t.elapsed().as_millis() as u64),
            "throughput": self.throughput,
            "jobs": self.jobs,
            "failures": self.failures,
        })
    }
}

impl Handler<CheckTitle> for TranslationGateway {
    type Result = TitleCheck;

    fn handle(&mut self, msg: CheckTitle, _: &mut Context<Self>) -> TitleCheck {
        let chars = msg.title.chars().count();
        // The original's rule of thumb, until this node has measured the backend.
        let (estimate, basis) = match self.throughput.estimate(chars) {
            Some(s) => (s.ceil(), "measured throughput"),
            None => ((5 + chars / 10).clamp(5, 60) as f64, "no measurement yet"),
        };
        let estimated_seconds = estimate.clamp(1.0, 86_400.0) as u32;
        let (ready, message) = match (&self.backend, &self.probe) {
            (None, _) => (
                false,
                "no translation backend is configured (translation.backend_url)".to_string(),
            ),
            (Some(_), None) => (
                false,
                "the translation backend has not been probed yet".to_string(),
            ),
            (Some(_), Some(Err(e))) => {
                (false, format!("the translation backend is not ready: {e}"))
            }
            (Some(_), Some(Ok(_))) => (true, format!("ready; estimate from {basis}")),
        };
        TitleCheck {
            ready,
            message,
            estimated_seconds,
        }
    }
}

fn job_error(job: &str, e: BackendError) -> JobError {
    match e {
        BackendError::Timeout(_) => JobError::Timeout(format!("job {job}: {e}")),
        BackendError::BadAnswer(_) => JobError::Failed(format!("job {job}: {e}")),
        BackendError::Unreachable(_) | BackendError::Status { .. } => {
            JobError::Unavailable(format!("job {job}: {e}"))
        }
    }
}

/// What a job measured, for the throughput estimate.
struct Measured {
    chars: usize,
    requests: u32,
}

/// One backend request within what is left of the job's deadline.
async fn ask(
    backend: &Backend,
    job: &str,
    deadline: Instant,
    system: &str,
    text: &str,
) -> Result<super::backend::Completion, JobError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(JobError::Timeout(format!(
            "job {job}: the deadline passed before the backend finished"
        )));
    }
    backend
        .complete(system, text, left)
        .await
        .map_err(|e| job_error(job, e))
}

async fn run_job(
    backend: Backend,
    job: Translate,
    chunk_chars: usize,
) -> (Result<Translated, JobError>, Measured) {
    let deadline = Instant::now() + job.deadline;
    let mut measured = Measured {
        chars: job.source.chars(),
        requests: 0,
    };
    let title_prompt = system_prompt(&job.source_language, &job.target_language, true);
    let doc_prompt = system_prompt(&job.source_language, &job.target_language, false);
    let id = job.job_id.as_str();
    let (title, markdown) = match &job.source {
        Source::Title(t) => (t.as_str(), None),
        Source::Document { title, markdown } => (title.as_str(), Some(markdown.as_str())),
        Source::Chunk(md) => ("", Some(md.as_str())),
    };
    let result = async {
        let mut out = Translated::default();
        if let Some(md) = markdown {
            let p = plan(md, chunk_chars);
            let mut translated = Vec::new();
            // One request at a time: the backend's own batching serves concurrent jobs, and a
            // document's pieces come back in order trivially.
            for chunk in p.chunks() {
                measured.requests += 1;
                let c = ask(&backend, id, deadline, &doc_prompt, &chunk).await?;
                out.tokens += c.total_tokens;
                out.inference += c.elapsed;
                translated.push(c.text);
            }
            out.markdown = p
                .assemble(&translated)
                .map_err(|e| JobError::Failed(format!("job {id}: {e}")))?;
        }
        if !title.trim().is_empty() {
            measured.requests += 1;
            let c = ask(&backend, id, deadline, &title_prompt, title).await?;
            out.title = c.text.trim().to_string();
            out.tokens += c.total_tokens;
            out.inference += c.elapsed;
        }
        Ok(out)
    }
    .await;
    (result, measured)
}

impl Handler<Translate> for TranslationGateway {
    type Result = ResponseActFuture<Self, Result<Translated, JobError>>;

    fn handle(&mut self, job: Translate, _: &mut Context<Self>) -> Self::Result {
        self.jobs += 1;
        let Some(backend) = self.backend.clone() else {
            self.failures += 1;
            let msg = format!(
                "job {}: no translation backend is configured (translation.backend_url)",
                job.job_id
            );
            return Box::pin(actix::fut::ready(Err(JobError::Unavailable(msg))));
        };
        let chunk_chars = self.settings.chunk_chars;
        Box::pin(run_job(backend, job, chunk_chars).into_actor(self).map(
            |(res, measured), act, _| {
                match &res {
                    Ok(t) => act
                        .throughput
                        .record(measured.chars, measured.requests, t.inference),
                    Err(_) => act.failures += 1,
                }
                res
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_follows_measured_throughput() {
        let mut t = Throughput::default();
        assert_eq!(t.estimate(100), None, "no estimate before a measurement");
        t.record(1000, 1, Duration::from_secs(10));
        assert_eq!(t.estimate(1000), Some(10.0));
        // A short title costs at least one request's fixed time.
        assert_eq!(t.estimate(1), Some(10.0));
        // A slower backend raises the estimate.
        t.record(1000, 1, Duration::from_secs(100));
        assert!(t.estimate(1000).unwrap() > 10.0);
    }
}
