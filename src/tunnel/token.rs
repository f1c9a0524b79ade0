//! `lodge token`: mints a development token.

/// Arguments of `lodge token`.
#[derive(clap::Args, Debug)]
pub struct TokenArgs {}

/// Prints a token.
pub fn run(_args: TokenArgs) -> i32 {
    eprintln!("lodge token: not built yet");
    2
}
