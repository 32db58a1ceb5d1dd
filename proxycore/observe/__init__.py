"""What an exchange leaves behind: access log, metrics, transcripts."""
