"""The SSH tunnel frontend: the stock OpenSSH client's ``ssh -L`` / ``ssh -D`` into the office.

``admission`` (pre-authentication caps, before any SSH byte is sent), ``auth`` (the two ways in:
keyboard-interactive password + TOTP code, and the portal's short-lived user certificates),
``server`` (the listener, the per-connection asyncssh server, the session channel's banner and
the tie between an SSH connection and its session), ``tunnel`` (everything after a
``direct-tcpip`` open request).
"""
