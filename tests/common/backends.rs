//! TCP backends on the test's own threads, for traffic through modules and the data plane.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener};

/// Serves every connection on its own thread with `serve`; answers the address.
fn serve_each(serve: impl Fn(std::net::TcpStream) + Send + Sync + Copy + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || serve(s));
        }
    });
    addr
}

/// An HTTP backend answering every request with `name` (one request per connection).
pub fn http_backend(name: &'static str) -> String {
    serve_each(move |s| {
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        while r.read_line(&mut line).is_ok_and(|n| n > 0) {
            if line == "\r\n" {
                break;
            }
            line.clear();
        }
        let _ = write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
            name.len()
        );
    })
}

/// A backend speaking enough RESP to answer PING with `+PONG <name>`, until the client leaves.
pub fn redis_backend(name: &'static str) -> String {
    serve_each(move |mut s| {
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            let _ = write!(s, "+PONG {name}\r\n");
        }
        let _ = s.shutdown(Shutdown::Write);
    })
}

/// Sends each connection `greeting` (if any), then its bytes back, then its end of stream back
/// as a half-close.
pub fn echo_backend(greeting: &'static [u8]) -> String {
    serve_each(move |mut s| {
        let mut w = s.try_clone().unwrap();
        let _ = w.write_all(greeting);
        let _ = std::io::copy(&mut s, &mut w);
        let _ = w.shutdown(Shutdown::Write);
    })
}
