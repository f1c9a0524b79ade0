//! `lodge.registry.v1.Translation`: checks the request, takes a job slot from the client's
//! registry actor (its concurrency, queue and rate limits), hands the job to the translation
//! gateway with the caller's deadline, and maps the outcome.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use lodge_actors::registry::{JobPermit, RegistryHandle, RegistryMetrics};
use lodge_actors::translate::gateway::{
    CheckTitle, JobError, Source, Translate, Translated, TranslationGateway,
};
use lodge_actors::ActorRef;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Caller;
use crate::deadline;
use crate::members::Members;
use crate::pb::registry as pb;

/// The Translation service.
pub struct TranslationService {
    gateway: ActorRef<TranslationGateway>,
    registry: RegistryHandle,
    members: Arc<Members>,
    metrics: RegistryMetrics,
    timeout: Duration,
}

impl TranslationService {
    /// Serves translations through `gateway`, limited per client by `registry`.
    pub fn new(
        gateway: ActorRef<TranslationGateway>,
        registry: RegistryHandle,
        members: Arc<Members>,
        metrics: RegistryMetrics,
        timeout: Duration,
    ) -> Self {
        Self {
            gateway,
            registry,
            members,
            metrics,
            timeout,
        }
    }
}

use crate::registry::present;

/// A job id the caller chose: bounded and free of control characters, as it names the job in
/// every error message and log line.
fn given_job_id(id: String) -> Result<String, Status> {
    lodge_actors::registry::record::required("job_id", &id).map_err(Status::invalid_argument)?;
    Ok(id)
}

fn new_job_id() -> String {
    format!("j-{:016x}", fastrand::u64(..))
}

fn job_status(e: JobError) -> Status {
    match e {
        JobError::Unavailable(m) => Status::unavailable(m),
        JobError::Timeout(m) => Status::deadline_exceeded(m),
        JobError::Failed(m) => Status::internal(m),
    }
}

fn outcome(r: &Result<Translated, Status>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(s) => match s.code() {
            tonic::Code::DeadlineExceeded => "timeout",
            tonic::Code::ResourceExhausted => "rejected",
            tonic::Code::Unavailable => "backend_error",
            _ => "error",
        },
    }
}

/// A job slot of `client_id` (its concurrency, queue and rate limits), counted as a rejected
/// job when refused. A registry client spends only its own registrations' slots.
async fn slot(
    registry: &RegistryHandle,
    members: &Members,
    metrics: &RegistryMetrics,
    caller: &Caller,
    client_id: &str,
    budget: Duration,
) -> Result<JobPermit, Status> {
    crate::registry::require_owner(registry, caller, client_id, budget).await?;
    registry.acquire_job(client_id, budget).await.map_err(|e| {
        let s = crate::registry::status(members, e);
        if s.code() == tonic::Code::ResourceExhausted {
            RegistryMetrics::outcome(&metrics.jobs, "rejected");
        }
        s
    })
}

/// Runs one job (its slot already taken) on the gateway within `budget`, and counts it.
async fn execute(
    gateway: &ActorRef<TranslationGateway>,
    metrics: &RegistryMetrics,
    job: Translate,
    budget: Duration,
) -> Result<Translated, Status> {
    let started = Instant::now();
    let job_id = job.job_id.clone();
    let job = Translate {
        deadline: budget,
        ..job
    };
    let result = match gateway.send_timeout(job, budget).await {
        Ok(r) => r.map_err(job_status),
        Err(lodge_actors::SendError::Timeout) => Err(Status::deadline_exceeded(format!(
            "job {job_id}: the backend did not finish before the deadline"
        ))),
        Err(e) => Err(deadline::send_status(e, "translation gateway")),
    };
    metrics.job_seconds.observe(started.elapsed().as_secs_f64());
    RegistryMetrics::outcome(&metrics.jobs, outcome(&result));
    if let Ok(t) = &result {
        metrics.tokens.inc_by(t.tokens);
    }
    result
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::TranslateChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::translation_server::Translation for TranslationService {
    async fn check_title(
        &self,
        req: Request<pb::TitleCheckRequest>,
    ) -> Result<Response<pb::TitleCheckResponse>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let m = req.into_inner();
        present("title", &m.title)?;
        present("language_tag", &m.language_tag)?;
        let c = self
            .gateway
            .send_timeout(CheckTitle { title: m.title }, budget)
            .await
            .map_err(|e| deadline::send_status(e, "translation gateway"))?;
        Ok(Response::new(pb::TitleCheckResponse {
            ready: c.ready,
            message: c.message,
            estimated_time_seconds: c.estimated_seconds as i32,
        }))
    }

    async fn translate(
        &self,
        req: Request<pb::TranslateRequest>,
    ) -> Result<Response<pb::TranslateResponse>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let caller = Caller::of(req.extensions());
        let m = req.into_inner();
        present("client_id", &m.client_id)?;
        present("target_language", &m.target_language)?;
        let primitive = pb::Primitive::try_from(m.primitive).unwrap_or_default();
        let source = match (primitive, m.source) {
            (
                pb::Primitive::Title | pb::Primitive::Unspecified,
                Some(pb::translate_request::Source::Title(t)),
            ) => {
                present("title", &t)?;
                Source::Title(t)
            }
            (
                pb::Primitive::DocTranslate | pb::Primitive::Unspecified,
                Some(pb::translate_request::Source::Doc(d)),
            ) => {
                present("doc.markdown", &d.markdown)?;
                Source::Document {
                    title: d.title,
                    markdown: d.markdown,
                }
            }
            (pb::Primitive::Title, _) => {
                return Err(Status::invalid_argument(
                    "title: required for primitive TITLE",
                ))
            }
            (pb::Primitive::DocTranslate, _) => {
                return Err(Status::invalid_argument(
                    "doc: required for primitive DOC_TRANSLATE",
                ))
            }
            (pb::Primitive::Unspecified, None) => {
                return Err(Status::invalid_argument("source: set title or doc"))
            }
        };
        let job_id = if m.job_id.is_empty() {
            new_job_id()
        } else {
            given_job_id(m.job_id)?
        };
        let started = Instant::now();
        let permit = slot(
            &self.registry,
            &self.members,
            &self.metrics,
            &caller,
            &m.client_id,
            budget,
        )
        .await?;
        // The job holds its slot until the backend is done with it, even if this call goes
        // away first: a caller that cancels and resubmits cannot exceed its slots.
        let job = Translate {
            job_id: job_id.clone(),
            source,
            source_language: m.source_language,
            target_language: m.target_language,
            deadline: budget,
            slot: Some(Arc::new(permit)),
        };
        let left = budget.saturating_sub(started.elapsed());
        let t = execute(&self.gateway, &self.metrics, job, left).await?;
        Ok(Response::new(pb::TranslateResponse {
            job_id,
            success: true,
            translated_title: t.title,
            translated_markdown: t.markdown,
            error_message: String::new(),
            completed_at: Some(SystemTime::now().into()),
            tokens_used: t.tokens as i64,
            inference_time_seconds: t.inference.as_secs_f64(),
        }))
    }

    type TranslateStreamStream = ChunkStream;

    async fn translate_stream(
        &self,
        req: Request<Streaming<pb::TranslateChunk>>,
    ) -> Result<Response<ChunkStream>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let caller = Caller::of(req.extensions());
        let mut input = req.into_inner();
        let first = input
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream sent no chunk"))?;
        present("client_id", &first.client_id)?;
        present("target_language", &first.target_language)?;
        let client_id = first.client_id.clone();
        let target = first.target_language.clone();
        let source_language = first.source_language.clone();
        let job_id = if first.job_id.is_empty() {
            new_job_id()
        } else {
            given_job_id(first.job_id.clone())?
        };
        let started = Instant::now();
        // One slot for the whole stream (it is one job, however many chunks it has), held by
        // each chunk's job as well as by the stream.
        let permit = Arc::new(
            slot(
                &self.registry,
                &self.members,
                &self.metrics,
                &caller,
                &client_id,
                budget,
            )
            .await?,
        );
        let (tx, rx) = mpsc::channel(4);
        let deadline = tokio::time::Instant::from_std(started + budget);
        let job = StreamJob {
            gateway: self.gateway.clone(),
            metrics: self.metrics.clone(),
            permit,
            job_id,
            target,
            source_language,
            started,
            budget,
        };
        tokio::spawn(async move {
            let work = job.run(first, input, &tx);
            // Once the answer headers are out the server's own timeout no longer applies: an
            // idle stream must not hold its slot for ever.
            if tokio::time::timeout_at(deadline, work).await.is_err() {
                let _ = tx
                    .send(Err(Status::deadline_exceeded(
                        "the stream's deadline passed (server.request_timeout_ms or the caller's)",
                    )))
                    .await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What a TranslateStream's chunks share.
struct StreamJob {
    gateway: ActorRef<TranslationGateway>,
    metrics: RegistryMetrics,
    /// The client's slot, held for the whole stream (and by each chunk's job).
    permit: Arc<JobPermit>,
    job_id: String,
    target: String,
    source_language: String,
    started: Instant,
    budget: Duration,
}

impl StreamJob {
    /// Translates the chunks in order and sends the answers, then the final chunk.
    async fn run(
        &self,
        first: pb::TranslateChunk,
        mut input: Streaming<pb::TranslateChunk>,
        tx: &mpsc::Sender<Result<pb::TranslateChunk, Status>>,
    ) {
        let (gateway, metrics, job_id) = (&self.gateway, &self.metrics, &self.job_id);
        let mut next = Some(first);
        let mut tokens = 0i64;
        let mut last_index = -1;
        loop {
            let chunk = match next.take() {
                Some(c) => c,
                None => match input.message().await {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                },
            };
            if chunk.chunk_index <= last_index || chunk.chunk_index == i32::MAX {
                let _ = tx
                        .send(Err(Status::invalid_argument(format!(
                            "chunk_index: {} after {last_index}; indexes must rise (and stay below 2^31 - 1)",
                            chunk.chunk_index
                        ))))
                        .await;
                return;
            }
            last_index = chunk.chunk_index;
            let is_final = chunk.is_final;
            if !chunk.content.trim().is_empty() {
                let job = Translate {
                    job_id: job_id.clone(),
                    source: Source::Chunk(chunk.content),
                    source_language: self.source_language.clone(),
                    target_language: self.target.clone(),
                    deadline: self.budget,
                    slot: Some(self.permit.clone()),
                };
                let left = self.budget.saturating_sub(self.started.elapsed());
                match execute(gateway, metrics, job, left).await {
                    Ok(t) => {
                        tokens += t.tokens as i64;
                        let answer = pb::TranslateChunk {
                            job_id: job_id.clone(),
                            chunk_index: chunk.chunk_index,
                            content: t.markdown,
                            tokens_used: t.tokens as i64,
                            ..Default::default()
                        };
                        if tx.send(Ok(answer)).await.is_err() {
                            return;
                        }
                    }
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                }
            }
            if is_final {
                break;
            }
        }
        let _ = tx
            .send(Ok(pb::TranslateChunk {
                job_id: job_id.clone(),
                chunk_index: last_index + 1,
                is_final: true,
                tokens_used: tokens,
                ..Default::default()
            }))
            .await;
    }
}
