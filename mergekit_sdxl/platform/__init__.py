"""What differs between Linux, Windows and macOS: libc tuning, CPU features, signals, file names, console text."""
