use super::Global;
use crate::exit::Exit;

#[derive(Debug, clap::Args)]
pub struct UsbArgs {}

pub fn run_usb(_a: UsbArgs, _g: &Global) -> anyhow::Result<Exit> {
    super::not_yet("usb")
}

#[derive(Debug, clap::Args)]
pub struct FelArgs {}

pub fn run_fel(_a: FelArgs, _g: &Global) -> anyhow::Result<Exit> {
    super::not_yet("fel")
}
