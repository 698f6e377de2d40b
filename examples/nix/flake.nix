# Commit flake.lock beside this file (`nix flake lock`): NIO builds with --no-update-lock-file, so every machine
# builds the same pinned nixpkgs, and a missing or stale lock fails the job as SourceInvalid.
{
  description = "Example NIO fleet: two hosts and a disko layout";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";
    disko.url = "github:nix-community/disko";
    disko.inputs.nixpkgs.follows = "nixpkgs";
  };

  outputs = { nixpkgs, disko, ... }:
    let
      host = name: modules: nixpkgs.lib.nixosSystem {
        system = "x86_64-linux";
        modules = [ disko.nixosModules.disko ./disko.nix ./common.nix { networking.hostName = name; } ] ++ modules;
      };
    in {
      nixosConfigurations = {
        web-01 = host "web-01" [ ./hosts/web-01/configuration.nix ];
        # Fleet attr: identical web nodes that take their host name from DHCP.
        web = host "web" [ ./hosts/web-01/configuration.nix { networking.hostName = nixpkgs.lib.mkForce ""; } ];
        db-01 = host "db-01" [ ./hosts/db-01/configuration.nix ];
        # Fleet attr of the database machines (db-fleet in examples/30-configurations.yaml).
        db = host "db" [ ./hosts/db-01/configuration.nix { networking.hostName = nixpkgs.lib.mkForce ""; } ];
        # Applied by onRemoveFlake when a configuration is deleted: a minimal, locked-down system.
        decommissioned = host "decommissioned" [ { services.openssh.enable = true; } ];
      };
    };
}
