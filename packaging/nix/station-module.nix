# NixOS module: the sbcflash factory station as a systemd service.
#
#   services.sbcflash-station = {
#     enable = true;
#     settings = { ... };            # station.toml, see `sbcflash station --help`
#   };
#
# The service runs as its own system user with access to block devices (group `disk`), serial
# consoles (`dialout`) and boards in USB recovery mode (group `sbcflash`, from the udev rules the
# package installs). Its only state, the ledger, lives in /var/lib/sbcflash-station.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.sbcflash-station;
  settingsFormat = pkgs.formats.toml { };
  stateDir = "/var/lib/sbcflash-station";
  # A line's central PostgreSQL ledger: the service waits for the network.
  central = lib.hasPrefix "postgres" (toString (cfg.settings.ledger or ""));
in
{
  options.services.sbcflash-station = {
    enable = lib.mkEnableOption "the sbcflash factory provisioning station";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The sbcflash package to run.";
    };

    settings = lib.mkOption {
      type = settingsFormat.type;
      default = { };
      example = lib.literalExpression ''
        {
          board = "rpi4";
          image = "/srv/images/nixos-sd-image.img.zst";
          slots = [ { name = "A"; match = { ID_PATH = "pci-0000:00:14.0-usb-0:1:1.0-scsi-0:0:0:0"; }; } ];
        }
      '';
      description = ''
        Contents of the station's configuration file (station.toml): board, image, slots and
        identity. Ignored when {option}`services.sbcflash-station.configFile` is set.
      '';
    };

    configFile = lib.mkOption {
      type = lib.types.path;
      default = settingsFormat.generate "station.toml" cfg.settings;
      defaultText = lib.literalMD "generated from {option}`services.sbcflash-station.settings`";
      description = "Path of the station configuration file passed as `--config`.";
    };

    flashPresent = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Also flash devices that are already present when the service starts.";
    };

    extraArgs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "-v" ];
      description = "Extra command-line arguments for `sbcflash station`.";
    };

    ledgerPasswordFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      example = "/run/secrets/sbcflash-ledger-password";
      description = ''
        For a central PostgreSQL ledger (`settings.ledger = "postgresql://..."`): a file with the
        database role's password, passed to the service as the systemd credential
        `ledger-password` (never copied into the Nix store or the configuration).
      '';
    };

    user = lib.mkOption {
      type = lib.types.str;
      default = "sbcflash-station";
      description = "User the station runs as.";
    };

    group = lib.mkOption {
      type = lib.types.str;
      default = "sbcflash-station";
      description = "Primary group of the station user.";
    };
  };

  config = lib.mkIf cfg.enable {
    # The udev rules give group `sbcflash` (and the logged-in user) the USB recovery devices.
    services.udev.packages = [ cfg.package ];
    environment.systemPackages = [ cfg.package ];

    users.groups.sbcflash = { };
    users.groups.${cfg.group} = { };
    users.users.${cfg.user} = {
      isSystemUser = true;
      group = cfg.group;
      home = stateDir;
      extraGroups = [
        "disk"
        "dialout"
        "sbcflash"
      ];
      description = "sbcflash factory station";
    };

    systemd.services.sbcflash-station = {
      description = "sbcflash factory provisioning station";
      documentation = [ "man:sbcflash-station(1)" ];
      wantedBy = [ "multi-user.target" ];
      after = [
        "systemd-udevd.service"
        "local-fs.target"
      ]
      ++ lib.optional central "network-online.target";
      wants = [ "systemd-udevd.service" ] ++ lib.optional central "network-online.target";
      environment = {
        # Ledger and cache under systemd-managed directories (StateDirectory, CacheDirectory).
        XDG_STATE_HOME = stateDir;
        SBCFLASH_CACHE_DIR = "/var/cache/sbcflash-station";
        NO_COLOR = "1";
      };
      serviceConfig = {
        ExecStart = lib.escapeShellArgs (
          [
            (lib.getExe cfg.package)
            "station"
            "--config"
            "${cfg.configFile}"
          ]
          ++ lib.optional cfg.flashPresent "--flash-present"
          ++ cfg.extraArgs
        );
        User = cfg.user;
        Group = cfg.group;
        SupplementaryGroups = [
          "disk"
          "dialout"
          "sbcflash"
        ];
        LoadCredential = lib.optional (
          cfg.ledgerPasswordFile != null
        ) "ledger-password:${toString cfg.ledgerPasswordFile}";
        StateDirectory = "sbcflash-station";
        StateDirectoryMode = "0750";
        CacheDirectory = "sbcflash-station";
        WorkingDirectory = stateDir;
        # A stop lets running slots finish their current step and record it in the ledger.
        KillSignal = "SIGINT";
        TimeoutStopSec = "2min";
        Restart = "on-failure";
        RestartSec = "5s";
        # Hardening that still leaves raw block devices, serial ports and USB usable.
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        ProtectKernelTunables = true;
        ProtectControlGroups = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        DevicePolicy = "closed";
        DeviceAllow = [
          "block-sd rw"
          "block-mmc rw"
          "block-blkext rw"
          "block-loop rw"
          "char-usb_device rw"
          "char-ttyUSB rw"
          "char-ttyACM rw"
          "char-ttyS rw"
        ];
      };
    };
  };
}
