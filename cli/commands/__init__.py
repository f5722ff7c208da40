"""`anchor` commands by group; importing a module registers its commands on cli.app."""
