//! The write-ahead log: numbered segment files of checksummed frames, one frame per group commit.
//!
//! A segment is `<dir>/wal/<seq>-<first index>.wal` (both 16 hex digits). It is preallocated when
//! created and its size and name are made durable once (fsync of the file and of the directory),
//! so an append overwrites space the file already has and its `fdatasync` flushes data only, never
//! size metadata. That is the whole point over an append-only file, and what etcd's WAL does.
//!
//! Layout: a 16-byte header (magic, then the segment's sequence number), then frames:
//!
//! ```text
//! frame  = len: u32 LE | crc: u32 LE | body (len bytes)
//! body   = record*
//! record = type: u8 | len: u32 LE | payload (len bytes)
//! ```
//!
//! The CRC32 covers the segment number, the frame's offset, its length and its body, so a frame
//! copied or left over at another place never passes for a valid one there. One frame holds a whole
//! group commit because pages reach the disk in any order: if a group were several independently
//! checksummed records, a crash in the middle of its write could leave a valid record after a
//! damaged one, which is indistinguishable from corruption of acknowledged data. With one frame
//! per write, everything past the last durable frame comes from one unfinished write.
//!
//! Every segment starts with a frame of the state in force when it was created (hard state, conf
//! state, snapshot marker, compaction point), so once the segments before it are deleted it still
//! replays to the right state.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState};

use super::{err, fsync_dir, DiskError, WriteBatch};

/// Preallocated size of a segment (as etcd). A group larger than what is left goes to a new one.
pub(super) const SEGMENT_SIZE: u64 = 64 << 20;
const MAGIC: &[u8; 8] = b"LODGWAL\x01";
const HEADER: u64 = 16;
const FRAME_HEADER: usize = 8;
const RECORD_HEADER: usize = 5;

/// One entry (protobuf `Entry`); it replaces every stored entry from its index on.
const ENTRY: u8 = 1;
/// The hard state (protobuf `HardState`); the latest wins.
const HARD_STATE: u8 = 2;
/// The conf state (protobuf `ConfState`); the latest wins.
const CONF_STATE: u8 = 3;
/// Forget every entry stored so far (a leader's snapshot replaces the log). No payload.
const CLEAR: u8 = 4;
/// Forget entries below an index (u64 LE): they are covered by the snapshot.
const COMPACT: u8 = 5;
/// The snapshot file now holds the snapshot at this index and term (two u64 LE).
const SNAPSHOT: u8 = 6;

/// Everything but the entries that replaying the log arrives at.
#[derive(Default, Clone)]
pub(super) struct State {
    pub(super) hard_state: HardState,
    pub(super) conf_state: ConfState,
    /// Index and term of the latest snapshot installed, which the snapshot file must match.
    pub(super) snapshot: Option<(u64, u64)>,
    /// Entries below this index are gone.
    pub(super) compact_below: u64,
    /// The last entry's index (or the snapshot's), for naming the next segment.
    pub(super) last_index: u64,
}

/// One segment file as far as it has been read or written.
pub(super) struct Segment {
    seq: u64,
    path: PathBuf,
    /// The highest index among its entries not cleared since (0: none). Once the log is compacted
    /// above it the whole file can go.
    max_index: u64,
    /// Where its valid frames end.
    end: u64,
    /// Valid frames, the initial state frame included.
    frames: u64,
}

/// What replaying the segments finds.
#[derive(Default)]
pub(super) struct Replay {
    pub(super) state: State,
    pub(super) entries: BTreeMap<u64, Entry>,
    segments: Vec<Segment>,
    /// A torn write at the end of the last segment: its offset and the end of the non-zero bytes.
    torn: Option<(u64, u64)>,
}

impl Replay {
    fn apply(&mut self, kind: u8, payload: &[u8]) -> Result<(), String> {
        let seg = self.segments.last_mut().expect("a segment is being read");
        match kind {
            ENTRY => {
                let e = Entry::parse_from_bytes(payload).map_err(|e| format!("entry: {e}"))?;
                // A leader's entries overwrite a conflicting suffix of ours.
                drop(self.entries.split_off(&e.index));
                seg.max_index = seg.max_index.max(e.index);
                self.state.last_index = e.index;
                self.entries.insert(e.index, e);
            }
            HARD_STATE => {
                self.state.hard_state =
                    HardState::parse_from_bytes(payload).map_err(|e| format!("hard state: {e}"))?;
            }
            CONF_STATE => {
                self.state.conf_state =
                    ConfState::parse_from_bytes(payload).map_err(|e| format!("conf state: {e}"))?;
            }
            CLEAR => {
                self.entries.clear();
                self.segments.iter_mut().for_each(|s| s.max_index = 0);
                self.state.last_index = self.state.snapshot.map_or(0, |(i, _)| i);
            }
            COMPACT => {
                let below = u64_at(payload, 0).ok_or("short compaction record")?;
                self.entries = self.entries.split_off(&below);
                self.state.compact_below = below;
            }
            SNAPSHOT => {
                let index = u64_at(payload, 0).ok_or("short snapshot record")?;
                let term = u64_at(payload, 8).ok_or("short snapshot record")?;
                self.state.snapshot = Some((index, term));
                self.state.last_index = self.state.last_index.max(index);
            }
            _ => return Err(format!("unknown record type {kind}")),
        }
        Ok(())
    }
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn frame_crc(seq: u64, offset: u64, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&offset.to_le_bytes());
    h.update(&(body.len() as u32).to_le_bytes());
    h.update(body);
    h.finalize()
}

/// The body of the valid frame at `at`, if there is one.
fn frame_at(data: &[u8], seq: u64, at: usize) -> Option<&[u8]> {
    let len = u32_at(data, at)? as usize;
    let crc = u32_at(data, at + 4)?;
    let start = at + FRAME_HEADER;
    let body = data.get(start..start.checked_add(len)?)?;
    // The record structure first: it costs a few steps, where the checksum of a garbage length
    // could cost megabytes, at each of the many offsets a torn tail is searched at.
    (len > 0 && records_fit(body) && frame_crc(seq, at as u64, body) == crc).then_some(body)
}

/// Whether `body` is a chain of records of known types filling it exactly.
fn records_fit(body: &[u8]) -> bool {
    let mut p = 0;
    while p < body.len() {
        let (Some(&kind), Some(len)) = (body.get(p), u32_at(body, p + 1)) else {
            return false;
        };
        if !(ENTRY..=SNAPSHOT).contains(&kind) {
            return false;
        }
        p += RECORD_HEADER + len as usize;
    }
    p == body.len()
}

fn put(buf: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    buf.push(kind);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(payload);
}

fn put_msg(buf: &mut Vec<u8>, kind: u8, m: &dyn protobuf::Message) -> Result<(), String> {
    put(buf, kind, &m.write_to_bytes().map_err(|e| e.to_string())?);
    Ok(())
}

fn put_snapshot(buf: &mut Vec<u8>, index: u64, term: u64) {
    let mut p = [0u8; 16];
    p[..8].copy_from_slice(&index.to_le_bytes());
    p[8..].copy_from_slice(&term.to_le_bytes());
    put(buf, SNAPSHOT, &p);
}

fn segment_name(seq: u64, first_index: u64) -> String {
    format!("{seq:016x}-{first_index:016x}.wal")
}

fn parse_name(name: &str) -> Option<u64> {
    let (seq, first) = name.strip_suffix(".wal")?.split_once('-')?;
    u64::from_str_radix(first, 16).ok()?;
    u64::from_str_radix(seq, 16).ok()
}

/// The segment files in `dir`, oldest first; they must be numbered without a hole.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, DiskError> {
    let mut out = Vec::new();
    let read = std::fs::read_dir(dir).map_err(|e| err(dir, "cannot list", e))?;
    for item in read {
        let item = item.map_err(|e| err(dir, "cannot list", e))?;
        let name = item.file_name();
        let name = name.to_string_lossy();
        if !name.ends_with(".wal") {
            continue;
        }
        let seq = parse_name(&name).ok_or_else(|| {
            err(
                &item.path(),
                "not a segment name",
                "expected <seq>-<index>.wal in hex",
            )
        })?;
        out.push((seq, item.path()));
    }
    out.sort();
    for w in out.windows(2) {
        if w[1].0 != w[0].0 + 1 {
            return Err(err(
                &w[1].1,
                "a segment is missing",
                format!(
                    "no segment {} before it; refusing to start on a damaged log",
                    w[0].0 + 1
                ),
            ));
        }
    }
    Ok(out)
}

/// One past the last non-zero byte. Compares blocks (memcmp) because most of a segment is
/// preallocated zeroes, and this runs on every start.
fn nonzero_end(data: &[u8]) -> usize {
    const ZERO: [u8; 4096] = [0; 4096];
    let mut end = data.len();
    while end > 0 {
        let start = end.saturating_sub(ZERO.len());
        let block = &data[start..end];
        if block != &ZERO[..block.len()] {
            return start + block.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
        }
        end = start;
    }
    0
}

fn read_segment(path: &Path, limit: Option<u64>) -> Result<Vec<u8>, DiskError> {
    let f = File::open(path).map_err(|e| err(path, "cannot open", e))?;
    let size = f.metadata().map_err(|e| err(path, "cannot open", e))?.len();
    let mut data = Vec::with_capacity(limit.unwrap_or(size).min(size) as usize);
    f.take(limit.unwrap_or(u64::MAX))
        .read_to_end(&mut data)
        .map_err(|e| err(path, "cannot read", e))?;
    Ok(data)
}

/// Replays the segments. `known` are the writer's own segments with the ends it wrote (reading
/// while the writer runs); `None` reads the directory after a start or a crash, and reports a torn
/// write at the tail instead of an error.
fn replay(dir: &Path, known: Option<&[Segment]>) -> Result<Replay, DiskError> {
    let listed: Vec<(u64, PathBuf, Option<u64>)> = match known {
        Some(segs) => segs
            .iter()
            .map(|s| (s.seq, s.path.clone(), Some(s.end)))
            .collect(),
        None => list_segments(dir)?
            .into_iter()
            .map(|(seq, p)| (seq, p, None))
            .collect(),
    };
    let mut r = Replay::default();
    let count = listed.len();
    for (i, (seq, path, limit)) in listed.into_iter().enumerate() {
        let last = i + 1 == count;
        let data = read_segment(&path, limit)?;
        r.segments.push(Segment {
            seq,
            path: path.clone(),
            max_index: 0,
            end: HEADER,
            frames: 0,
        });
        if last && known.is_none() && nonzero_end(&data) == 0 {
            // Created but not yet durable when the node stopped: nothing was ever written to it.
            break;
        }
        if data.get(..8) != Some(&MAGIC[..]) || u64_at(&data, 8) != Some(seq) {
            return Err(err(
                &path,
                "not a Lodge log segment",
                "bad header; refusing to start on a damaged log",
            ));
        }
        let mut at = HEADER as usize;
        while let Some(body) = frame_at(&data, seq, at) {
            let mut p = 0;
            while p < body.len() {
                let rec = (|| {
                    let kind = *body.get(p)?;
                    let len = u32_at(body, p + 1)? as usize;
                    let start = p + RECORD_HEADER;
                    Some((kind, body.get(start..start.checked_add(len)?)?))
                })();
                let Some((kind, payload)) = rec else {
                    return Err(err(
                        &path,
                        &format!("damaged frame at offset {at}"),
                        "a record runs past its frame",
                    ));
                };
                r.apply(kind, payload).map_err(|e| {
                    err(
                        &path,
                        &format!("damaged record in the frame at offset {at}"),
                        e,
                    )
                })?;
                p += RECORD_HEADER + payload.len();
            }
            at += FRAME_HEADER + body.len();
            let seg = r.segments.last_mut().unwrap();
            seg.end = at as u64;
            seg.frames += 1;
        }
        // `at` is the first byte that is not a valid frame: the clean end if only zeroes follow.
        let nonzero_end = nonzero_end(&data);
        if at >= nonzero_end {
            continue;
        }
        let corrupt = |why: &str| {
            err(
                &path,
                &format!("damaged record at offset {at}"),
                format!("{why}; refusing to start on a damaged log"),
            )
        };
        if !last || known.is_some() {
            return Err(corrupt("checksum mismatch in the middle of the log"));
        }
        // Only the one write in flight at a crash can have left bytes past the last durable frame,
        // and it was one frame: a valid frame after the damage means acknowledged data is damaged.
        if (at + 1..nonzero_end).any(|p| frame_at(&data, seq, p).is_some()) {
            return Err(corrupt("checksum mismatch followed by valid records"));
        }
        r.torn = Some((at as u64, nonzero_end as u64));
    }
    Ok(r)
}

/// The writer's side of the log: the active segment and what it needs to cut the next one.
pub(super) struct Wal {
    dir: PathBuf,
    segment_size: u64,
    segments: Vec<Segment>,
    file: File,
    state: State,
    /// Reused for every frame.
    buf: Vec<u8>,
}

impl Wal {
    /// Replays `dir` (created if missing), cuts away a torn tail, and opens the last segment for
    /// appending (or a new one).
    pub(super) fn open(dir: &Path, segment_size: u64) -> Result<(Wal, Replay), DiskError> {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| err(dir, "cannot create directory", e))?;
            fsync_dir(dir.parent().unwrap_or(dir))?;
        }
        let mut r = replay(dir, None)?;
        let mut segments = std::mem::take(&mut r.segments);
        if let Some((at, end)) = r.torn.take() {
            let seg = segments.last().expect("a torn segment");
            // Zeroes, so that the log ends cleanly there again; this write was never acknowledged.
            let f = OpenOptions::new()
                .write(true)
                .open(&seg.path)
                .map_err(|e| err(&seg.path, "cannot open", e))?;
            f.write_all_at(&vec![0; (end - at) as usize], at)
                .and_then(|()| f.sync_data())
                .map_err(|e| err(&seg.path, "cannot cut the torn tail", e))?;
        }
        // A last segment without its state frame (its creation was cut short) goes: appending to
        // it would leave a segment that does not replay on its own once older ones are deleted.
        let mut next = 1;
        if segments.last().is_some_and(|seg| seg.frames == 0) {
            let seg = segments.pop().expect("checked");
            std::fs::remove_file(&seg.path).map_err(|e| err(&seg.path, "cannot remove", e))?;
            next = seg.seq;
        }
        let file = match segments.last() {
            Some(seg) => OpenOptions::new()
                .write(true)
                .open(&seg.path)
                .map_err(|e| err(&seg.path, "cannot open", e))?,
            None => {
                let (seg, file) = create_segment(dir, next, &r.state, segment_size)?;
                segments.push(seg);
                file
            }
        };
        let wal = Wal {
            dir: dir.to_path_buf(),
            segment_size,
            segments,
            file,
            state: r.state.clone(),
            buf: Vec::new(),
        };
        Ok((wal, r))
    }

    fn active(&mut self) -> &mut Segment {
        self.segments.last_mut().expect("an active segment")
    }

    /// Starts segment `seq` and makes it the active one.
    fn cut(&mut self, seq: u64) -> Result<(), DiskError> {
        let (seg, file) = create_segment(&self.dir, seq, &self.state, self.segment_size)?;
        self.segments.push(seg);
        self.file = file;
        Ok(())
    }

    /// Writes the batches as one frame and waits for `fdatasync`.
    pub(super) fn append(&mut self, batches: &[&WriteBatch]) -> Result<(), DiskError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.extend_from_slice(&[0; FRAME_HEADER]);
        let encoded = batches.iter().try_for_each(|b| encode(b, &mut buf));
        let result = encoded
            .map_err(|e| err(&self.active().path.clone(), "encode", e))
            .and_then(|()| self.write_frame(&mut buf));
        self.buf = buf;
        result?;
        for b in batches {
            self.note(b);
        }
        Ok(())
    }

    fn write_frame(&mut self, buf: &mut [u8]) -> Result<(), DiskError> {
        let size = self.segment_size;
        let seg = self.active();
        // A group that does not fit goes to a new segment, unless this one holds nothing yet.
        if seg.end + buf.len() as u64 > size && seg.frames > 1 {
            let next = seg.seq + 1;
            self.cut(next)?;
        }
        let seg = self.segments.last_mut().expect("an active segment");
        let body_len = buf.len() - FRAME_HEADER;
        let crc = frame_crc(seg.seq, seg.end, &buf[FRAME_HEADER..]);
        buf[..4].copy_from_slice(&(body_len as u32).to_le_bytes());
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        self.file
            .write_all_at(buf, seg.end)
            .map_err(|e| err(&seg.path, "write", e))?;
        self.file
            .sync_data()
            .map_err(|e| err(&seg.path, "fdatasync", e))?;
        seg.end += buf.len() as u64;
        seg.frames += 1;
        Ok(())
    }

    /// Brings the writer's state up to a batch just made durable (what replay would find).
    fn note(&mut self, b: &WriteBatch) {
        let s = &mut self.state;
        if let Some(snap) = &b.snapshot {
            let m = snap.get_metadata();
            s.snapshot = Some((m.index, m.term));
            s.last_index = s.last_index.max(m.index);
        }
        if b.clear_entries {
            self.segments.iter_mut().for_each(|seg| seg.max_index = 0);
            s.last_index = s.snapshot.map_or(0, |(i, _)| i);
        }
        if let Some(last) = b.entries.last() {
            s.last_index = last.index;
            let max = b.entries.iter().map(|e| e.index).max().unwrap_or(0);
            let seg = self.segments.last_mut().expect("an active segment");
            seg.max_index = seg.max_index.max(max);
        }
        if let Some(below) = b.compact_below {
            s.compact_below = below;
        }
        if let Some(hs) = &b.hard_state {
            s.hard_state = hs.clone();
        }
        if let Some(cs) = &b.conf_state {
            s.conf_state = cs.clone();
        }
    }

    /// Deletes the oldest segments while every entry in them is compacted away. Whole files only;
    /// the active segment always stays.
    pub(super) fn compact(&mut self) -> Result<(), DiskError> {
        while self.segments.len() > 1 && self.segments[0].max_index < self.state.compact_below {
            let seg = self.segments.remove(0);
            std::fs::remove_file(&seg.path).map_err(|e| err(&seg.path, "cannot remove", e))?;
        }
        Ok(())
    }

    /// Replays what this writer has made durable.
    pub(super) fn load(&self) -> Result<Replay, DiskError> {
        replay(&self.dir, Some(&self.segments))
    }
}

/// Encodes a batch's records in the order the old single-transaction commit applied them:
/// snapshot, clear, entries, compaction, hard state, conf state.
fn encode(b: &WriteBatch, buf: &mut Vec<u8>) -> Result<(), String> {
    if let Some(s) = &b.snapshot {
        let m = s.get_metadata();
        put_snapshot(buf, m.index, m.term);
    }
    if b.clear_entries {
        put(buf, CLEAR, &[]);
    }
    for e in &b.entries {
        put_msg(buf, ENTRY, e)?;
    }
    if let Some(below) = b.compact_below {
        put(buf, COMPACT, &below.to_le_bytes());
    }
    if let Some(hs) = &b.hard_state {
        put_msg(buf, HARD_STATE, hs)?;
    }
    if let Some(cs) = &b.conf_state {
        put_msg(buf, CONF_STATE, cs)?;
    }
    Ok(())
}

/// Creates segment `seq`, preallocated, starting with `state`, and makes it and its name durable
/// before anything is written to it.
fn create_segment(
    dir: &Path,
    seq: u64,
    state: &State,
    segment_size: u64,
) -> Result<(Segment, File), DiskError> {
    let path = dir.join(segment_name(seq, state.last_index + 1));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| err(&path, "cannot create segment", e))?;
    let mut body = Vec::new();
    let enc = |body: &mut Vec<u8>| -> Result<(), String> {
        put_msg(body, HARD_STATE, &state.hard_state)?;
        put_msg(body, CONF_STATE, &state.conf_state)?;
        if let Some((index, term)) = state.snapshot {
            put_snapshot(body, index, term);
        }
        if state.compact_below > 0 {
            put(body, COMPACT, &state.compact_below.to_le_bytes());
        }
        Ok(())
    };
    enc(&mut body).map_err(|e| err(&path, "encode", e))?;
    let mut head = Vec::with_capacity(HEADER as usize + FRAME_HEADER + body.len());
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&seq.to_le_bytes());
    head.extend_from_slice(&(body.len() as u32).to_le_bytes());
    head.extend_from_slice(&frame_crc(seq, HEADER, &body).to_le_bytes());
    head.extend_from_slice(&body);
    // set_len rather than written zeroes: blocks still get allocated on the first write to them
    // (once per 4 KiB, not per append), but the file size, the metadata an append would make
    // every fdatasync flush, is settled here once.
    file.set_len(segment_size.max(head.len() as u64))
        .and_then(|()| file.write_all_at(&head, 0))
        .and_then(|()| file.sync_all())
        .map_err(|e| err(&path, "cannot create segment", e))?;
    fsync_dir(dir)?;
    let seg = Segment {
        seq,
        path,
        max_index: 0,
        end: head.len() as u64,
        frames: 1,
    };
    Ok((seg, file))
}
