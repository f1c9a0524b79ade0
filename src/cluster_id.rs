//! The cluster id: which cluster a data directory belongs to. Every peer call carries it and a
//! peer of another cluster is refused (see `lodge_grpc::peer`).
//!
//! Founding members derive it from `cluster.initial_cluster` (the sorted member list) and
//! `cluster.initial_cluster_token`, so the members of one bootstrap agree on it without talking
//! (etcd does the same); a one-member cluster draws it at random; a joining node learns it from
//! the member it joins through. It is stored in the data directory (`cluster-id`, 16 hex digits)
//! the first time, and from then on the stored id is the node's, whatever the configuration says.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lodge_grpc::peer::{format_id, parse_id};

/// The file in the data directory.
pub const FILE: &str = "cluster-id";

fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// The stored id, `None` when there is none yet; a file that holds no id is an error (naming it).
pub fn load(data_dir: &Path) -> Result<Option<u64>, String> {
    let p = path(data_dir);
    match std::fs::read_to_string(&p) {
        Ok(text) => parse_id(&text).map(Some).ok_or_else(|| {
            format!(
                "{}: does not hold a cluster id (16 hex digits); restore it, or remove it together with the data directory's raft log",
                p.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", p.display())),
    }
}

/// Stores `id` (written to a temporary file and renamed: never half written).
pub fn store(data_dir: &Path, id: u64) -> Result<(), String> {
    let p = path(data_dir);
    let tmp = data_dir.join(format!("{FILE}.tmp"));
    std::fs::write(&tmp, format!("{}\n", format_id(id)))
        .and_then(|()| std::fs::rename(&tmp, &p))
        .map_err(|e| format!("{}: {e}", p.display()))
}

/// The id founding members agree on: FNV-1a over the token and the sorted `ID=ADDRESS` list
/// (stable across versions and platforms, unlike std's hasher). Never 0.
pub fn derive(members: &BTreeMap<u64, String>, token: &str) -> u64 {
    let mut text = format!("{token}\n");
    for (id, addr) in members {
        text.push_str(&format!("{id}={addr}\n"));
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h.max(1)
}

/// A fresh id for a one-member cluster.
pub fn random() -> u64 {
    fastrand::u64(1..)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_stored_and_read_back_and_a_bad_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()), Ok(None));
        store(dir.path(), 0xdead_beef).unwrap();
        assert_eq!(load(dir.path()), Ok(Some(0xdead_beef)));
        assert_eq!(
            std::fs::read_to_string(dir.path().join(FILE)).unwrap(),
            "00000000deadbeef\n"
        );
        std::fs::write(dir.path().join(FILE), "garbage").unwrap();
        let e = load(dir.path()).unwrap_err();
        assert!(e.contains(FILE) && e.contains("hex"), "{e}");
    }

    #[test]
    fn founding_members_derive_one_id_and_the_token_tells_clusters_apart() {
        let a: BTreeMap<u64, String> = [(1, "h:1".into()), (2, "h:2".into())].into();
        let b: BTreeMap<u64, String> = [(2, "h:2".into()), (1, "h:1".into())].into();
        assert_eq!(derive(&a, ""), derive(&b, ""));
        assert_ne!(derive(&a, ""), derive(&a, "staging"));
        let c: BTreeMap<u64, String> = [(1, "h:1".into()), (2, "h:3".into())].into();
        assert_ne!(derive(&a, ""), derive(&c, ""));
        assert_ne!(random(), 0);
    }
}
