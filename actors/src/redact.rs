//! Hiding secrets wherever configuration or actor state is shown (NodeInfo, `lodge ctl actor`,
//! error messages, logs): by key name (`api_key`, `*_secret`, `*token*`, ...) and by value
//! (credentials inside URLs, `http://user:password@host/`).

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
        // The URL ends at whitespace or a quote (a URL inside a sentence or a JSON string); its
        // authority at the path, query or fragment.
        let token_end = tail
            .find(|c: char| matches!(c, '"' | '\'') || c.is_whitespace())
            .unwrap_or(tail.len());
        let token = &tail[..token_end];
        let end = token.find(['/', '?', '#']).unwrap_or(token.len());
        let authority = &token[..end];
        // A scheme's "://" right after the authority (`a://b://c`) starts the next URL.
        let end = if authority.ends_with(':') && token[end..].starts_with("//") {
            end - 1
        } else {
            end
        };
        let authority = &token[..end];
        match authority.rfind('@') {
            Some(at) => {
                hide_userinfo(&mut out, &authority[..at]);
                out.push_str(&authority[at..]);
                rest = &tail[end..];
            }
            None => match unescaped_password(token, authority) {
                // `user:pa/ss@host`: a password with a raw '/', '?' or '#' is not a valid URL,
                // but it is still a password, and the error that names the URL must not show it.
                Some(at) => {
                    hide_userinfo(&mut out, &token[..at]);
                    rest = &tail[at..];
                }
                None => {
                    out.push_str(authority);
                    rest = &tail[end..];
                }
            },
        }
    }
    out.push_str(rest);
    out
}

/// Writes `userinfo` (what stands before the authority's '@') with its secret hidden.
fn hide_userinfo(out: &mut String, userinfo: &str) {
    match userinfo.split_once(':') {
        Some((user, _password)) => {
            out.push_str(user);
            out.push(':');
            out.push_str(REDACTED);
        }
        None => out.push_str(REDACTED),
    }
}

/// Where the '@' ending a password with a raw delimiter is in `token`, if `authority` (the text
/// before the first delimiter) reads `user:pass...` rather than `host:port` or `[v6]:port`.
fn unescaped_password(token: &str, authority: &str) -> Option<usize> {
    if authority.starts_with('[') {
        return None;
    }
    let (_, after_colon) = authority.split_once(':')?;
    if after_colon.bytes().all(|b| b.is_ascii_digit()) {
        return None; // host:port (or host:), a URL with '@' in its path
    }
    token[authority.len()..]
        .find('@')
        .map(|i| authority.len() + i)
}

/// Keys whose values are never shown. A path to a file holding a secret (`hs256_secret_file`)
/// is not a secret: showing it tells an operator which file is in use.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    if k.ends_with("_file") || k.ends_with("_path") {
        return false;
    }
    ["secret", "password", "token", "api_key", "credential"]
        .iter()
        .any(|s| k.contains(s))
}

/// Hides, in a JSON document about to be shown, the values of secret keys and the credentials of
/// URLs in any string. An empty secret stays empty: it tells that none is set. Only strings are
/// secrets: numbers under such keys (`total_tokens` of a translation) stay.
pub fn json(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                let set = val.as_str().is_some_and(|s| !s.is_empty());
                if is_secret_key(k) && set {
                    *val = serde_json::Value::String(REDACTED.into());
                } else {
                    json(val);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(json),
        serde_json::Value::String(s) if s.contains("://") => *s = url_credentials(s),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_token_users_are_hidden_hosts_and_paths_are_not() {
        let table = [
            // Userinfo with a password, and a lone user that is a token.
            (
                "http://bob:s3cr%40t@llm.local:8000/v1",
                "http://bob:<redacted>@llm.local:8000/v1",
            ),
            (
                "http://ghp_token@llm.local/v1?x=a@b",
                "http://<redacted>@llm.local/v1?x=a@b",
            ),
            // No userinfo: unchanged, '@' in the path or query included.
            ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
            ("http://host/v1/a@b", "http://host/v1/a@b"),
            ("http://host:80/~bob@team/x", "http://host:80/~bob@team/x"),
            ("http://host?to=a@b", "http://host?to=a@b"),
            ("http://host#a:b@c", "http://host#a:b@c"),
            // IPv6 hosts, with and without userinfo.
            ("http://[::1]:8000/v1", "http://[::1]:8000/v1"),
            ("http://[fe80::1%25eth0]/a@b", "http://[fe80::1%25eth0]/a@b"),
            ("http://u:p@[::1]:80/x", "http://u:<redacted>@[::1]:80/x"),
            // Inside sentences and JSON strings; several URLs.
            (
                "backend \"http://u:p@h\" and http://v:q@[::1]:80/x down",
                "backend \"http://u:<redacted>@h\" and http://v:<redacted>@[::1]:80/x down",
            ),
            // A password with a raw '/', '?' or '#' (not a valid URL, still a password).
            ("http://bob:pa/ss@host/v1", "http://bob:<redacted>@host/v1"),
            ("http://bob:p?w#d@host", "http://bob:<redacted>@host"),
            // An empty password, an empty user.
            ("http://bob:@host", "http://bob:<redacted>@host"),
            ("http://:pw@host", "http://:<redacted>@host"),
            // Garbage.
            ("no url: a@b:c", "no url: a@b:c"),
            ("http://u:p@", "http://u:<redacted>@"),
            ("ends with ://", "ends with ://"),
            ("://@", "://<redacted>@"),
            (":// :@", ":// :@"),
            ("", ""),
            ("a://b://c:d@e", "a://b://c:<redacted>@e"),
            ("a://b@c://d:e@f", "a://<redacted>@c://d:<redacted>@f"),
            ("héllo://ü:ß@ñ/é", "héllo://ü:<redacted>@ñ/é"),
        ];
        for (given, shown) in table {
            assert_eq!(url_credentials(given), shown, "{given:?}");
        }
    }

    #[test]
    fn secret_keys_and_url_passwords_are_hidden_in_json() {
        let mut v = serde_json::json!({
            "a": {"api_key": "k", "jwt_secret": "s", "hs256_secret_file": "/etc/k",
                  "control_token": "t", "password": "", "token": null, "total_tokens": 12,
                  "backend_url": "http://bob:pw@llm:8000/v1", "endpoints": ["http://x@h:1"]},
            "n": 3,
        });
        json(&mut v);
        assert_eq!(v["a"]["api_key"], REDACTED);
        assert_eq!(v["a"]["jwt_secret"], REDACTED);
        assert_eq!(v["a"]["control_token"], REDACTED);
        assert_eq!(v["a"]["hs256_secret_file"], "/etc/k");
        assert_eq!(v["a"]["password"], "", "an unset secret shows as unset");
        assert_eq!(v["a"]["token"], serde_json::Value::Null);
        assert_eq!(v["a"]["total_tokens"], 12);
        assert_eq!(v["a"]["backend_url"], "http://bob:<redacted>@llm:8000/v1");
        assert_eq!(v["a"]["endpoints"][0], "http://<redacted>@h:1");
        assert_eq!(v["n"], 3);
    }
}
