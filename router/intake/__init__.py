"""Every channel (SMTP/LMTP, IMAP, pipe) hands messages to `accept`: one durable way in."""
