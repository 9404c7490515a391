"""Test support code, kept out of the wheel: a local Hub server and transcriptions of the official loops."""
