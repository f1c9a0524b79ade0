//! Hiding credentials that travel inside URLs (`http://user:password@host/`) wherever a URL is
//! shown: configuration dumps, actor state, error messages and logs.

/// What stands in for a hidden value.
pub const REDACTED: &str = "<redacted>";

/// `text` with the credentials of every URL in it hidden: `scheme://user:password@host` becomes
/// `scheme://user:<redacted>@host`, and a lone `scheme://token@host` (a user name that is a
/// token, as some services use) becomes `scheme://<redacted>@host`. Text without such URLs comes
/// back unchanged.
pub fn url_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the path, query or fragment, or at whitespace or a quote (a URL
        // inside a sentence or a JSON string).
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#' | '"' | '\'') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                match authority[..at].split_once(':') {
                    Some((user, _password)) => {
                        out.push_str(user);
                        out.push(':');
                        out.push_str(REDACTED);
                    }
                    None => out.push_str(REDACTED),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_token_users_are_hidden_hosts_and_paths_are_not() {
        assert_eq!(
            url_credentials("http://bob:s3cr%40t@llm.local:8000/v1"),
            "http://bob:<redacted>@llm.local:8000/v1"
        );
        assert_eq!(
            url_credentials("http://ghp_token@llm.local/v1?x=a@b"),
            "http://<redacted>@llm.local/v1?x=a@b"
        );
        assert_eq!(
            url_credentials("http://127.0.0.1:8000/v1"),
            "http://127.0.0.1:8000/v1"
        );
        assert_eq!(
            url_credentials("backend \"http://u:p@h\" and http://v:q@[::1]:80/x down"),
            "backend \"http://u:<redacted>@h\" and http://v:<redacted>@[::1]:80/x down"
        );
        assert_eq!(url_credentials("no url: a@b:c"), "no url: a@b:c");
        assert_eq!(url_credentials("http://u:p@"), "http://u:<redacted>@");
        assert_eq!(url_credentials("ends with ://"), "ends with ://");
    }
}
