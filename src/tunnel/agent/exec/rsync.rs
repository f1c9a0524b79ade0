//! What an rsync session may run, and its arguments as rsync meant them.
//!
//! rsync writes its remote command for a shell: since 3.2.4 it backslash-escapes spaces and the
//! characters a shell would act on (`dst\ dir/`). Over ssh the remote shell removes the
//! backslashes; the agent runs the command without a shell (a shell would make the rsync role an
//! exec role), so it removes them itself, as a shell does for an unquoted word. Nothing else a
//! shell does happens: no `~`, no globbing (rsync expands remote wildcards itself when given
//! `--secluded-args`/`-s`), no variables.

/// The command to run for an rsync session's `command`: it must be `rsync --server ...`, exactly
/// those two first words, and not daemon mode (whose config file can run commands).
pub(super) fn server_command(command: &[String]) -> Result<Vec<String>, String> {
    let shown = || command.join(" ");
    match command {
        [first, second, ..] if first == "rsync" && second == "--server" => {}
        _ => {
            return Err(format!(
                "lodge agent: an rsync session runs only `rsync --server ...`, not `{}`",
                shown()
            ))
        }
    }
    let words: Vec<String> = command.iter().map(|w| shell_unescape(w)).collect();
    if words.iter().any(|w| w == "--daemon") {
        return Err(format!(
            "lodge agent: an rsync session does not run rsync's daemon mode (--daemon): `{}`",
            shown()
        ));
    }
    Ok(words)
}

/// `word` as a POSIX shell reads it unquoted, as far as backslashes go: `\X` is X, and a
/// backslash before a newline joins the lines.
pub(super) fn shell_unescape(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    let mut chars = word.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\n') => {}
            Some(escaped) => out.push(escaped),
            // A trailing backslash has nothing to escape and stays.
            None => out.push('\\'),
        }
    }
    out
}
