//! `lodge bench disk`: the cost of one durable append of a raft entry, through Lodge's write-ahead
//! log (the storage thread, one frame and one `fdatasync` per write) and, as baselines in the same
//! run on the same disk, through a plain append-only file with `fdatasync`, and through a file
//! preallocated like a WAL segment (the floor: data only, no size metadata to flush).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use lodge_actors::cluster::disk::{Disk, WriteBatch};
use raft::eraftpb::Entry;

use super::{median, Outcome};

/// Appends done before timing, so that start-up costs (first block allocations) do not count.
const WARM_UP: usize = 20;

fn entry(index: u64, bytes: usize) -> Entry {
    Entry {
        index,
        term: 1,
        data: vec![b'x'; bytes].into(),
        ..Default::default()
    }
}

/// Median and 99th percentile, in microseconds.
fn summary(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let p99 = v[((v.len() as f64 * 0.99) as usize).min(v.len() - 1)];
    (median(v), p99)
}

/// `e` as a one-line message saying what failed.
fn io(what: &'static str) -> impl Fn(std::io::Error) -> String {
    move |e| format!("{what}: {e}")
}

fn wal(dir: &std::path::Path, appends: usize, bytes: usize) -> Outcome<Vec<f64>> {
    let (disk, _) = Disk::open(&dir.join("wal")).map_err(|e| format!("opening the WAL: {e}"))?;
    let mut out = Vec::with_capacity(appends);
    for i in 1..=(WARM_UP + appends) as u64 {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = Instant::now();
        let batch = WriteBatch {
            number: i,
            entries: vec![entry(i, bytes)],
            ..Default::default()
        };
        disk.write(
            batch,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv()
            .map_err(|_| "the WAL's storage thread stopped".to_string())?
            .map_err(|e| format!("a WAL write: {e}"))?;
        if i as usize > WARM_UP {
            out.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    disk.close();
    Ok(out)
}

/// `preallocate`: overwrite a file whose size was set (and made durable) beforehand, as a WAL
/// segment is; otherwise append, growing the file on every write.
fn plain(
    dir: &std::path::Path,
    appends: usize,
    bytes: usize,
    preallocate: bool,
) -> Outcome<Vec<f64>> {
    let path = dir.join(if preallocate {
        "prealloc.log"
    } else {
        "plain.log"
    });
    let mut f = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .map_err(io("creating the log file"))?;
    // The WAL's framing adds about this much to an entry.
    let record = vec![b'x'; bytes + 24];
    if preallocate {
        f.set_len(((WARM_UP + appends) * record.len()) as u64 + (1 << 20))
            .map_err(io("preallocating"))?;
        f.sync_all().map_err(io("fsync"))?;
    }
    let mut out = Vec::with_capacity(appends);
    for i in 0..WARM_UP + appends {
        let t = Instant::now();
        if preallocate {
            f.write_all_at(&record, (i * record.len()) as u64)
                .map_err(io("writing"))?;
        } else {
            f.write_all(&record).map_err(io("appending"))?;
        }
        f.sync_data().map_err(io("fdatasync"))?;
        if i >= WARM_UP {
            out.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(out)
}

pub fn run(appends: usize, bytes: usize) -> Outcome {
    let dir =
        tempfile::tempdir_in(".").map_err(io("a scratch directory in the working directory"))?;
    let (w50, w99) = summary(wal(dir.path(), appends, bytes)?);
    let (p50, p99) = summary(plain(dir.path(), appends, bytes, false)?);
    let (f50, f99) = summary(plain(dir.path(), appends, bytes, true)?);
    println!(
        "lodge bench disk: {appends} single-entry durable appends of {bytes} bytes, one at a time"
    );
    println!();
    println!("| path | p50 µs | p99 µs |");
    println!("|---|---|---|");
    println!("| WAL append through the storage thread (Lodge) | {w50:.0} | {w99:.0} |");
    println!("| append + fdatasync on a plain file (baseline) | {p50:.0} | {p99:.0} |");
    println!("| overwrite + fdatasync in a preallocated file (floor) | {f50:.0} | {f99:.0} |");
    println!();
    println!(
        "ratio WAL / plain: p50 {:.2}, p99 {:.2}",
        w50 / p50,
        w99 / p99
    );
    println!(
        "ratio WAL / preallocated: p50 {:.2}, p99 {:.2}",
        w50 / f50,
        w99 / f99
    );
    Ok(())
}
