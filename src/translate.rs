//! `lodge translate`: a title or a markdown file through the translation gateway, as a
//! registered client (the registry client library registers, heartbeats while the job runs, and
//! unregisters at the end).

use std::time::Duration;

use lodge_grpc::pb::registry as pb;
use lodge_grpc::registry_client::{ClientOptions, RegistryClient};
use serde_json::json;

use crate::ctl::Connection;
use crate::failover;

/// What `lodge translate` takes.
#[derive(clap::Args, Debug)]
pub struct TranslateArgs {
    /// A title to translate.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    title: Option<String>,
    /// A markdown document to translate.
    #[arg(long)]
    file: Option<std::path::PathBuf>,
    /// Source language (BCP 47), e.g. en.
    #[arg(long, default_value = "")]
    from: String,
    /// Target language (BCP 47), e.g. fr-CA.
    #[arg(long)]
    to: String,
    /// Send the document in pieces and print each translated piece as it arrives.
    #[arg(long, requires = "file")]
    stream: bool,
    /// Only ask whether the title can be translated now (CheckTitle).
    #[arg(long, requires = "title")]
    check: bool,
}

/// Splits a document at blank lines outside fenced code blocks into pieces of about `max`
/// characters, each keeping its own trailing blank lines, so that the pieces concatenate back
/// to the document.
pub fn pieces(doc: &str, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut fence: Option<&str> = None;
    for line in doc.split_inclusive('\n') {
        let t = line.trim_start();
        match fence {
            Some(f) if t.starts_with(f) => fence = None,
            None if t.starts_with("```") => fence = Some("```"),
            None if t.starts_with("~~~") => fence = Some("~~~"),
            _ => {}
        }
        cur.push_str(line);
        if fence.is_none() && line.trim().is_empty() && cur.chars().count() >= max {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Runs `lodge translate`; returns the exit code.
pub async fn run(conn: Connection, a: TranslateArgs) -> i32 {
    let mut opts = ClientOptions::new(failover::endpoints(&conn), "lodge-cli", "cli");
    opts.tls = match failover::tls(&conn) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("lodge: {e}");
            return 2;
        }
    };
    let client = RegistryClient::start(opts, None);
    let result = work(&client, &a, conn.json).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), client.shutdown()).await;
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("lodge: {e}");
            1
        }
    }
}

async fn work(client: &RegistryClient, a: &TranslateArgs, as_json: bool) -> Result<(), String> {
    client.wait_registered(Duration::from_secs(30)).await?;
    let status = |s: tonic::Status| lodge_grpc::client::status_line(&s);
    if let (Some(title), true) = (&a.title, a.check) {
        let r = client
            .check_title(pb::TitleCheckRequest {
                title: title.clone(),
                language_tag: a.to.clone(),
                source_language: a.from.clone(),
                client_id: String::new(),
            })
            .await
            .map_err(status)?;
        if as_json {
            println!(
                "{}",
                json!({"ready": r.ready, "message": r.message, "estimated_time_seconds": r.estimated_time_seconds})
            );
        } else {
            println!(
                "ready={} estimate={}s {}",
                r.ready, r.estimated_time_seconds, r.message
            );
        }
        return if r.ready { Ok(()) } else { Err(r.message) };
    }
    let (primitive, source) = match (&a.title, &a.file) {
        (Some(title), _) => (
            pb::Primitive::Title,
            pb::translate_request::Source::Title(title.clone()),
        ),
        (None, Some(path)) => {
            let doc = std::fs::read_to_string(path)
                .map_err(|e| format!("--file {}: {e}", path.display()))?;
            if a.stream {
                return stream(client, a, &doc, as_json).await;
            }
            let slug = path.file_stem().map(|s| s.to_string_lossy().into_owned());
            (
                pb::Primitive::DocTranslate,
                pb::translate_request::Source::Doc(pb::DocumentContent {
                    markdown: doc,
                    slug: slug.unwrap_or_default(),
                    ..Default::default()
                }),
            )
        }
        (None, None) => unreachable!("clap requires --title or --file"),
    };
    let r = client
        .translate(pb::TranslateRequest {
            primitive: primitive as i32,
            source: Some(source),
            source_language: a.from.clone(),
            target_language: a.to.clone(),
            requested_at: Some(std::time::SystemTime::now().into()),
            ..Default::default()
        })
        .await
        .map_err(status)?;
    print_response(&r, as_json);
    Ok(())
}

/// Sends `doc` in pieces on one TranslateStream and prints the answers as they come.
async fn stream(
    client: &RegistryClient,
    a: &TranslateArgs,
    doc: &str,
    as_json: bool,
) -> Result<(), String> {
    let status = |s: tonic::Status| lodge_grpc::client::status_line(&s);
    let parts = pieces(doc, 2000);
    let last = parts.len().saturating_sub(1);
    let (from, to) = (a.from.clone(), a.to.clone());
    let chunks = parts
        .into_iter()
        .enumerate()
        .map(move |(i, content)| pb::TranslateChunk {
            chunk_index: i as i32,
            is_final: i == last,
            content,
            target_language: to.clone(),
            source_language: from.clone(),
            ..Default::default()
        });
    let mut answers = client
        .translate_stream(tokio_stream::iter(chunks))
        .await
        .map_err(status)?;
    while let Some(c) = answers.message().await.map_err(status)? {
        if as_json {
            println!(
                "{}",
                json!({"job_id": c.job_id, "chunk_index": c.chunk_index, "is_final": c.is_final, "content": c.content, "tokens_used": c.tokens_used})
            );
        } else if !c.is_final {
            print!("{}", c.content);
        } else {
            eprintln!("(job {}: {} tokens)", c.job_id, c.tokens_used);
        }
    }
    Ok(())
}

fn print_response(r: &pb::TranslateResponse, as_json: bool) {
    if as_json {
        println!(
            "{}",
            json!({
                "job_id": r.job_id,
                "success": r.success,
                "translated_title": r.translated_title,
                "translated_markdown": r.translated_markdown,
                "tokens_used": r.tokens_used,
                "inference_time_seconds": r.inference_time_seconds,
            })
        );
        return;
    }
    if !r.translated_title.is_empty() {
        println!("{}", r.translated_title);
    }
    if !r.translated_markdown.is_empty() {
        print!("{}", r.translated_markdown);
    }
    eprintln!(
        "(job {}: {} tokens, {:.2} s of inference)",
        r.job_id, r.tokens_used, r.inference_time_seconds
    );
}

#[cfg(test)]
mod tests {
    use super::pieces;

    #[test]
    fn pieces_concatenate_back_and_never_cut_a_code_block() {
        let doc = "# T\n\npara one\n\n```\ncode\n\nmore code\n```\n\npara two\n";
        let p = pieces(doc, 1);
        assert_eq!(p.concat(), doc);
        assert!(p.iter().any(|x| x.contains("code\n\nmore code")), "{p:?}");
        assert_eq!(pieces(doc, 10_000).len(), 1);
    }
}
