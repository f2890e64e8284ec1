"""The gateway: mutual TLS, identity from client certificates, authorization, and the one
process that serves every service."""
