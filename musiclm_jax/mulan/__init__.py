"""MuLan: the joint music-text embedding whose tokens condition MusicLM (text tower first)."""
