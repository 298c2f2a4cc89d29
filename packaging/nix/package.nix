# The sbcflash package: built from Cargo.lock (every dependency is a crates.io crate, so no
# outputHashes are needed), with the man pages, shell completions and udev rules that the
# Debian package ships too.
{
  lib,
  stdenv,
  rustPlatform,
  pkg-config,
  installShellFiles,
  udev,
  libusb1,
  src ? ../..,
}:

let
  cargoToml = builtins.fromTOML (builtins.readFile ../../Cargo.toml);
  # Only what the build needs, so editing README or tests does not rebuild the package.
  source = lib.fileset.toSource {
    root = src;
    fileset = lib.fileset.unions (
      [
        (src + "/Cargo.toml")
        (src + "/Cargo.lock")
        (src + "/src")
        (src + "/README.md")
        (src + "/docs")
        (src + "/packaging")
      ]
      ++ lib.optional (builtins.pathExists (src + "/build.rs")) (src + "/build.rs")
      ++ lib.optional (builtins.pathExists (src + "/boards")) (src + "/boards")
      ++ lib.optional (builtins.pathExists (src + "/udev-rules")) (src + "/udev-rules")
    );
  };
in
rustPlatform.buildRustPackage {
  pname = cargoToml.package.name;
  version = cargoToml.package.version;
  src = source;

  cargoLock.lockFile = ../../Cargo.lock;

  nativeBuildInputs = [
    pkg-config
    installShellFiles
  ];
  buildInputs = [
    udev
    libusb1
  ];

  # The integration tests need root, loop devices, udevd and QEMU: they run from
  # scripts/test.sh on a real machine, not in the build sandbox. Unit tests are pure.
  cargoTestFlags = [ "--lib" ];

  postInstall =
    lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
      mkdir -p man
      $out/bin/sbcflash --quiet man --out-dir man
      installManPage man/*.1
      installShellCompletion --cmd sbcflash \
        --bash <($out/bin/sbcflash completions bash) \
        --zsh <($out/bin/sbcflash completions zsh) \
        --fish <($out/bin/sbcflash completions fish)
    ''
    + ''
      if [ -d udev-rules ]; then
        install -Dm644 -t $out/lib/udev/rules.d udev-rules/*.rules
      fi
      install -Dm644 packaging/config.example.toml $out/share/doc/sbcflash/examples/config.toml
      install -Dm644 docs/json.md $out/share/doc/sbcflash/json.md
    '';

  meta = {
    description = cargoToml.package.description;
    license = with lib.licenses; [
      mit
      asl20
    ];
    mainProgram = "sbcflash";
    platforms = lib.platforms.linux;
  };
}
