{ lib, ... }:
{
  # extra.nix and facter.json are added by NIO (additionalFiles) before the build.
  imports = lib.optional (builtins.pathExists ./extra.nix) ./extra.nix;
  hardware.facter.reportPath = lib.mkIf (builtins.pathExists ./facter.json) ./facter.json;
  services.postgresql.enable = true;
  # The password arrives as a NIO secret under /run/nio/secrets, outside the Nix store.
  systemd.services.postgresql.serviceConfig.LoadCredential = [ "password:/run/nio/secrets/postgres-password" ];
}
