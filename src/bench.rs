//! `lodge bench`: throughput and footprint figures, each beside a baseline measured in the same run.
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum Bench {}

pub fn run(cmd: Bench) -> i32 {
    match cmd {}
}
