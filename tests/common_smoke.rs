mod common;

#[test]
fn nixos_like_image_is_built_with_real_tools() {
    if !common::require(false, &["sfdisk", "mkfs.vfat", "mkfs.ext4", "mcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for table in [common::Table::Mbr, common::Table::Gpt] {
        let img = common::make_nixos_like_image(dir.path(), "t.img", 64, table);
        let out = common::run(std::process::Command::new("sfdisk").arg("-d").arg(&img));
        let dump = String::from_utf8_lossy(&out.stdout);
        assert!(dump.contains("start=       16384"), "{dump}");
        common::run(
            std::process::Command::new("e2fsck")
                .args(["-fn"])
                .arg(format!("{}?offset={}", img.display(), 24 << 20)),
        );
    }
}
