"""Where containers come from: each module turns what a runtime (or `run`) hands over into sessions."""
