"""`python -m service.server`: run the server (flags: `--help`)."""

from service.server.app import main

main()
