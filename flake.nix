{
  description = "sbcflash: from a blank single-board computer to a NixOS that nixos-rebuild can manage";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
        "riscv64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      # `nix build`, `nix run . -- --help`
      packages = forAllSystems (pkgs: {
        sbcflash = pkgs.callPackage ./packaging/nix/package.nix { };
        default = self.packages.${pkgs.stdenv.hostPlatform.system}.sbcflash;
      });

      apps = forAllSystems (pkgs: {
        default = {
          type = "app";
          program = "${self.packages.${pkgs.stdenv.hostPlatform.system}.sbcflash}/bin/sbcflash";
        };
      });

      overlays.default = final: _prev: {
        sbcflash = final.callPackage ./packaging/nix/package.nix { };
      };

      # services.sbcflash-station; its package defaults to this flake's build.
      nixosModules.station =
        { pkgs, lib, ... }:
        {
          imports = [ ./packaging/nix/station-module.nix ];
          services.sbcflash-station.package =
            lib.mkDefault
              self.packages.${pkgs.stdenv.hostPlatform.system}.sbcflash;
        };
      nixosModules.default = self.nixosModules.station;

      # `nix develop`: the toolchain, the native libraries and the real tools the tests use.
      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.sbcflash ];
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            cargo-nextest
            cargo-deny
            cargo-fuzz
            bmaptool
            android-tools
            zstd
            xz
            e2fsprogs
            dosfstools
            mtools
            util-linux
            socat
            qemu
          ];
        };
      });

      # `nix flake check`: the package builds and the module evaluates into a NixOS system.
      checks = forAllSystems (
        pkgs:
        let
          system = pkgs.stdenv.hostPlatform.system;
          eval = nixpkgs.lib.nixosSystem {
            inherit system;
            modules = [
              self.nixosModules.station
              {
                services.sbcflash-station = {
                  enable = true;
                  settings.board = "rpi4";
                };
                boot.loader.grub.enable = false;
                fileSystems."/".device = "/dev/null";
                system.stateVersion = "25.05";
              }
            ];
          };
        in
        {
          package = self.packages.${system}.sbcflash;
          station-unit = eval.config.systemd.units."sbcflash-station.service".unit;
        }
      );
    };
}
