//! `lodge bench disk`: the cost of one durable append of a raft entry, through Lodge's redb log
//! and, as the baseline in the same run, through a plain append-only file with `fdatasync` (what
//! etcd's write-ahead log does).

use std::fs::OpenOptions;
use std::io::Write;
use std::time::Instant;

use lodge_actors::cluster::disk::{Disk, WriteBatch};
use raft::eraftpb::Entry;

use super::median;

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

pub fn run(appends: usize, bytes: usize) {
    let dir = tempfile::tempdir_in(".").expect("scratch directory next to the working directory");
    let (disk, _) = Disk::open(&dir.path().join("redb")).expect("open");
    let mut redb = Vec::with_capacity(appends);
    for i in 1..=appends as u64 {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = Instant::now();
        let batch = WriteBatch {
            number: i,
            entries: vec![entry(i, bytes)],
            ..Default::default()
        };
        disk.write(batch, Box::new(move |r| tx.send(r).unwrap()));
        rx.recv().unwrap().expect("write");
        redb.push(t.elapsed().as_secs_f64() * 1e6);
    }
    disk.close();

    let path = dir.path().join("plain.log");
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("log file");
    let mut plain = Vec::with_capacity(appends);
    let record = vec![b'x'; bytes + 24];
    for _ in 0..appends {
        let t = Instant::now();
        f.write_all(&record).unwrap();
        f.sync_data().unwrap();
        plain.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let (r50, r99) = summary(redb);
    let (p50, p99) = summary(plain);
    println!(
        "lodge bench disk: {appends} single-entry durable appends of {bytes} bytes, one at a time"
    );
    println!();
    println!("| path | p50 µs | p99 µs |");
    println!("|---|---|---|");
    println!("| redb commit through the storage thread (Lodge) | {r50:.0} | {r99:.0} |");
    println!("| append + fdatasync on a plain file (baseline) | {p50:.0} | {p99:.0} |");
    println!();
    println!(
        "ratio redb / plain: p50 {:.2}, p99 {:.2}",
        r50 / p50,
        r99 / p99
    );
}
