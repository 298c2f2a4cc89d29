use super::Global;
use crate::exit::Exit;

#[derive(Debug, clap::Args)]
pub struct WriteArgs {}

pub fn run_write(_a: WriteArgs, _g: &Global) -> anyhow::Result<Exit> {
    super::not_yet("write")
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {}

pub fn run_list(_a: ListArgs, _g: &Global) -> anyhow::Result<Exit> {
    super::not_yet("list")
}

#[derive(Debug, clap::Args)]
pub struct HashArgs {}

pub fn run_hash(_a: HashArgs, _g: &Global) -> anyhow::Result<Exit> {
    super::not_yet("hash")
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {}

pub fn run_verify(_a: VerifyArgs, _g: &Global) -> anyhow::Result<Exit> {
    super::not_yet("verify")
}
