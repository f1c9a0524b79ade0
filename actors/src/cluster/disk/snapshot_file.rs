//! The latest snapshot, in its own file `<dir>/snapshot`: it can be megabytes and is replaced
//! whole, which a log would only have to copy around.
//!
//! Format: magic (8 bytes) | length: u64 LE | CRC32 of the payload: u32 LE | protobuf `Snapshot`.
//!
//! Installing one is a small two-phase commit with the log: the new snapshot is written to
//! `snapshot.tmp` and fsynced; then the log frame that records its index and term (and clears or
//! compacts entries) is made durable, which is the commit point; then the file is renamed over
//! `snapshot` and the directory fsynced. A start that finds a `snapshot.tmp` matching the log's
//! latest snapshot record finishes the rename; any other one is an unfinished first phase and goes.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::Snapshot;

use super::{err, fsync_dir, DiskError};

const MAGIC: &[u8; 8] = b"LODGSNP\x01";
const HEADER: usize = 20;

fn path(dir: &Path) -> PathBuf {
    dir.join("snapshot")
}

fn tmp_path(dir: &Path) -> PathBuf {
    dir.join("snapshot.tmp")
}

fn id(s: &Snapshot) -> (u64, u64) {
    (s.get_metadata().index, s.get_metadata().term)
}

/// First phase: the snapshot durable in `snapshot.tmp`.
pub(super) fn prepare(dir: &Path, snap: &Snapshot) -> Result<(), DiskError> {
    let tmp = tmp_path(dir);
    let payload = snap
        .write_to_bytes()
        .map_err(|e| err(&tmp, "encode snapshot", e))?;
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| err(&tmp, "cannot create", e))?;
    f.write_all(&out)
        .and_then(|()| f.sync_all())
        .map_err(|e| err(&tmp, "write snapshot", e))
}

/// Last phase, once the log records the snapshot: it replaces the previous one.
pub(super) fn install(dir: &Path) -> Result<(), DiskError> {
    std::fs::rename(tmp_path(dir), path(dir)).map_err(|e| err(&path(dir), "rename", e))?;
    fsync_dir(dir)
}

fn read(path: &Path) -> Result<Option<Snapshot>, DiskError> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(path, "cannot read", e)),
    };
    let damaged = |why: &str| err(path, "damaged snapshot file", why);
    if data.len() < HEADER || &data[..8] != MAGIC {
        return Err(damaged("bad header"));
    }
    let len = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(data[16..20].try_into().expect("4 bytes"));
    let payload = &data[HEADER..];
    if payload.len() as u64 != len {
        return Err(damaged("length mismatch"));
    }
    if crc32fast::hash(payload) != crc {
        return Err(damaged("checksum mismatch"));
    }
    Snapshot::parse_from_bytes(payload)
        .map(Some)
        .map_err(|e| damaged(&e.to_string()))
}

/// The snapshot the log says is installed (`marker`: its index and term). `repair` (at a start)
/// finishes or discards an install a crash interrupted.
pub(super) fn load(
    dir: &Path,
    marker: Option<(u64, u64)>,
    repair: bool,
) -> Result<Snapshot, DiskError> {
    let tmp = tmp_path(dir);
    if repair && tmp.exists() {
        let committed = matches!(read(&tmp), Ok(Some(s)) if Some(id(&s)) == marker);
        if committed {
            install(dir)?;
        } else {
            std::fs::remove_file(&tmp).map_err(|e| err(&tmp, "cannot remove", e))?;
        }
    }
    let path = path(dir);
    let snap = read(&path)?;
    match (snap, marker) {
        (None, None) => Ok(Snapshot::default()),
        (Some(s), Some(m)) if id(&s) == m => Ok(s),
        (s, m) => Err(err(
            &path,
            "snapshot file does not match the log",
            format!(
                "the file holds {:?}, the log records {:?} (index, term); refusing to start",
                s.as_ref().map(id),
                m
            ),
        )),
    }
}
