"""Code shared by the API and generator services: the wire contract, Redis access, telemetry."""
