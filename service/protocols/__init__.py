"""The wire protocols: each one object that reads its requests and renders its answers and
errors (`base.Protocol`). The server's front door asks them; they know nothing of each other."""
