{ ... }:
{
  boot.loader.systemd-boot.enable = true;
  services.openssh.enable = true;
  # The executors' public key; NIO logs in as root.
  users.users.root.openssh.authorizedKeys.keys = [
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl nio-executor"
  ];
  system.stateVersion = "25.05";
}
