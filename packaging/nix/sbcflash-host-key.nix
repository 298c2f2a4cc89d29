# NixOS module: on first boot, move the SSH host key that the sbcflash station made for this
# unit (`[identity] host_key` in station.toml) from the FAT partition into /etc/ssh, before sshd
# starts (so sshd presents the key the station recorded, and `sbcflash station report
# --known-hosts` lists it). The key leaves the FAT partition afterwards.
#
#   imports = [ ./sbcflash-host-key.nix ];
#   services.sbcflash-host-key.enable = true;
#   # .path = "sbcflash/ssh_host_ed25519_key";  .device = "/dev/disk/by-label/FIRMWARE";
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.sbcflash-host-key;
in
{
  options.services.sbcflash-host-key = {
    enable = lib.mkEnableOption "installing the sbcflash station's per-unit SSH host key";

    device = lib.mkOption {
      type = lib.types.str;
      default = "/dev/disk/by-label/FIRMWARE";
      description = "The FAT partition the station wrote the key to (NixOS SD images: FIRMWARE).";
    };

    path = lib.mkOption {
      type = lib.types.str;
      default = "sbcflash/ssh_host_ed25519_key";
      description = "The key's path inside the FAT partition: the station's `[identity] host_key`.";
    };
  };

  config = lib.mkIf cfg.enable {
    systemd.services.sbcflash-host-key = {
      description = "Install the SSH host key made by the sbcflash station";
      # Wanted, not required, by sshd: a card without a key (or a failed move) still gets an
      # sshd, with keys NixOS makes itself.
      wantedBy = [
        "multi-user.target"
        "sshd.service"
      ];
      before = [
        "sshd.service"
        "sshd-keygen.service"
      ];
      unitConfig.ConditionPathExists = "!/etc/ssh/ssh_host_ed25519_key";
      path = [
        pkgs.openssh
        pkgs.util-linux
        pkgs.coreutils
      ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
      };
      script = ''
        [ -e ${lib.escapeShellArg cfg.device} ] || exit 0
        mnt="$(mktemp -d)"
        mount -t vfat ${lib.escapeShellArg cfg.device} "$mnt"
        trap 'umount "$mnt"; rmdir "$mnt"' EXIT
        ${pkgs.runtimeShell} ${./sbcflash-host-key.sh} "$mnt" ${lib.escapeShellArg cfg.path} /etc/ssh
      '';
    };
  };
}
