use super::Global;
use crate::exit::Exit;

#[derive(Debug, clap::Args)]
pub struct ConsoleArgs {}

pub fn run_console(_a: ConsoleArgs, _g: &Global) -> anyhow::Result<Exit> {
    super::not_yet("console")
}

#[derive(Debug, clap::Args)]
pub struct BootstrapArgs {}

pub fn run_bootstrap(_a: BootstrapArgs, _g: &Global) -> anyhow::Result<Exit> {
    super::not_yet("bootstrap")
}

#[derive(Debug, clap::Args)]
pub struct SerialLoadArgs {}

pub fn run_serial_load(_a: SerialLoadArgs, _g: &Global) -> anyhow::Result<Exit> {
    super::not_yet("serial-load")
}
