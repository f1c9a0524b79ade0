//! A real rsync through an rsync session. rsync starts its remote shell itself, so the shell
//! here is a script that hands the test rsync's remote command and then its protocol, over two
//! FIFOs; the test carries them over the user's side of a link to `serve_rsync`, which runs the
//! real `rsync --server`. This covers the agent's side with the actual protocol (binary data both
//! ways, the exit status after the last byte) and the arguments as rsync escapes them.

use std::path::Path;

use bytes::Bytes;
use lodge_grpc::pb::router::Rsync;
use rustix::fs::{mkfifoat, Mode, CWD};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use super::LIMIT;
use crate::tunnel::agent::exec::serve_rsync;
use crate::tunnel::exec::session::{self, Outcome, UserIo};
use crate::tunnel::link_pair;

/// The remote shell: `SHELL HOST rsync --server ...`. It sends the command (NUL after each word,
/// one more to end) up, then relays its stdin up and `down` to its stdout. Like `lodge
/// rsync-shell`, it exits when the session's output ends (`down` closes), which rsync waits for.
fn shell_script(up: &Path, down: &Path) -> String {
    format!(
        "#!/bin/sh\nshift\nexec 3>'{up}'\nprintf '%s\\0' \"$@\" >&3\nprintf '\\0' >&3\n\
         exec 4<&0\ncat <&4 >&3 4<&- &\nexec cat <'{down}' 3>&- 4<&-\n",
        up = up.display(),
        down = down.display()
    )
}

fn write_tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub dir")).unwrap();
    std::fs::write(root.join("a.txt"), "alpha\n").unwrap();
    // Binary and bigger than a frame, so that it takes several.
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(root.join("sub dir/b.bin"), blob).unwrap();
}

#[tokio::test]
async fn rsync_copies_a_tree_through_a_session() {
    let installed = std::process::Command::new("rsync")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        installed,
        "this test runs the real rsync, which is not installed (apt-get install rsync)"
    );
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    // A space in the remote path: rsync escapes it for a shell, the agent must undo that.
    let dst = dir.path().join("dst dir");
    write_tree(&src);
    let (up_path, down_path) = (dir.path().join("up"), dir.path().join("down"));
    for fifo in [&up_path, &down_path] {
        mkfifoat(CWD, fifo, Mode::RUSR | Mode::WUSR).unwrap();
    }
    let script = dir.path().join("shell.sh");
    std::fs::write(&script, shell_script(&up_path, &down_path)).unwrap();
    let mut up = pipe::OpenOptions::new().open_receiver(&up_path).unwrap();
    // Read-write, so that it opens before the script has opened its end.
    let down = pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(&down_path)
        .unwrap();

    let rsync = tokio::process::Command::new("rsync")
        .arg("-a")
        .arg("-e")
        .arg(format!("sh {}", script.display()))
        .arg(format!("{}/", src.display()))
        .arg(format!("workflow:{}/", dst.display()))
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // The remote command comes first, then the protocol.
    let mut head = Vec::new();
    let end = loop {
        if let Some(at) = head.windows(2).position(|w| w == b"\0\0") {
            break at;
        }
        let n = tokio::time::timeout(LIMIT, up.read_buf(&mut head))
            .await
            .expect("no command from rsync's remote shell")
            .unwrap();
        assert!(n > 0, "the remote shell ended before sending the command");
    };
    let command: Vec<String> = head[..end]
        .split(|b| *b == 0)
        .map(|w| String::from_utf8(w.to_vec()).unwrap())
        .collect();
    assert_eq!(command[..2], ["rsync", "--server"]);
    let rest = Bytes::copy_from_slice(&head[end + 2..]);

    let (input_tx, input) = mpsc::channel(4);
    tokio::spawn(async move {
        if !rest.is_empty() && input_tx.send(rest).await.is_err() {
            return;
        }
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = up.read(&mut buf).await {
            if input_tx
                .send(Bytes::copy_from_slice(&buf[..n]))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let (user, agent) = link_pair();
    let server = tokio::spawn(serve_rsync(agent, Rsync { command }));
    let mut stderr = Vec::new();
    let io = UserIo {
        input,
        resizes: None,
        stdout: down,
        stderr: &mut stderr,
    };
    let outcome = tokio::time::timeout(LIMIT, session::run(user, io))
        .await
        .expect("the session did not end");
    assert_eq!(
        outcome,
        Outcome::Exited(0),
        "{}",
        String::from_utf8_lossy(&stderr)
    );
    assert_eq!(
        tokio::time::timeout(LIMIT, server).await.unwrap().unwrap(),
        Ok(())
    );
    let local = tokio::time::timeout(LIMIT, rsync.wait_with_output())
        .await
        .expect("the local rsync did not end")
        .unwrap();
    assert!(
        local.status.success(),
        "rsync: {}",
        String::from_utf8_lossy(&local.stderr)
    );
    for file in ["a.txt", "sub dir/b.bin"] {
        assert_eq!(
            std::fs::read(dst.join(file)).unwrap(),
            std::fs::read(src.join(file)).unwrap(),
            "{file}"
        );
    }
}
