"""Face-recognition adapter (embedding students, margin losses, relational KD). Not built yet: see the README."""
