"""Real servers on 127.0.0.1 for the store tests: moto's S3, the GCS emulator, a Hub stand-in,
and a proxy that injects faults in front of any of them."""
