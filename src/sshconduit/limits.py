"""Every limit a peer can push on, in one place."""

MAX_VERSION_LINE = 255  # RFC 4253 4.2, including CR LF
MAX_PRE_VERSION_LINES = 1024  # banner lines a server may send before its version line
MAX_PRE_VERSION_BYTES = 64 * 1024
MAX_PACKET_LENGTH = 256 * 1024 + 1024  # the packet_length field; OpenSSH allows 256 KiB
MAX_PAYLOAD_WE_SEND = 32 * 1024 + 1024  # payloads we build stay within what every peer must accept
# Between two sshconduit peers (version string says so): bigger data packets and windows cut per-packet cost.
# The packet stays under MAX_PACKET_LENGTH, which the peer checks too.
PEER_MAX_PAYLOAD = 64 * 1024 + 1024
PEER_MAX_PACKET = 64 * 1024  # CHANNEL_DATA bytes per packet we ask a sshconduit peer for
PEER_WINDOW = 4 * 1024 * 1024  # as many packets in flight as OpenSSH's 2 MiB of 32 KiB packets

DEFAULT_REKEY_BYTES = 1 << 30  # rekey after 1 GiB in either direction
MAX_KEX_INIT_WAIT_PACKETS = 64  # non-kex packets we hold back while a rekey runs before complaining

MAX_AUTH_ATTEMPTS = 6  # sshd's MaxAuthTries default
LOGIN_GRACE_TIME = 120.0  # seconds before auth must succeed
MAX_AUTH_MESSAGES_WAITING = 16  # auth messages a client may send while its password is being checked
FAILED_PASSWORD_MIN_TIME = 2.0  # seconds a failed system password check takes at least (pam_unix's delay)
# UsePAM keyboard-interactive: questions PAM may ask in one attempt (conversation calls that prompt), and how
# long its thread waits for one answer (LoginGraceTime usually ends the connection first)
MAX_PAM_ROUNDS = 16
PAM_ANSWER_TIMEOUT = LOGIN_GRACE_TIME
PAM_SESSION_TIMEOUT = 30.0  # seconds pam_open_session may take before the session channel is refused

MAX_CHANNELS = 20000  # channels a peer may have open on one connection
# conduitd: channels one connection may hold. Each forwarded channel holds a socket; conduitd raises its
# RLIMIT_NOFILE to the hard limit at start (rlimits.py), and a connection past the fds left gets open failures
# ("resource shortage"), not a crash. 16,384 lets one client forward 10,000 connections, as OpenSSH (no cap) does.
MAX_SERVER_CHANNELS = 16384
FORWARD_LISTEN_BACKLOG = 4096  # -L listeners: a burst of connects waits in the queue, not in SYN retries
LISTEN_BACKLOG = 128  # OpenSSH's SSH_LISTEN_BACKLOG: conduitd's own listener (privsep) and -R listeners
DEFAULT_WINDOW = 2 * 1024 * 1024  # OpenSSH's CHAN_TCP_WINDOW_DEFAULT
DEFAULT_MAX_PACKET = 32 * 1024  # OpenSSH's CHAN_TCP_PACKET_DEFAULT
MAX_WINDOW = (1 << 32) - 1
# Receive-window auto-tuning (HPN-SSH's lesson: a fixed 2 MiB window caps a stream at window/RTT, ~40 MB/s at
# 50 ms). A channel whose peer keeps exhausting the window while we consume promptly doubles it, up to this;
# the growth of all channels on one connection together stays under the second cap, bounding memory.
MAX_AUTO_WINDOW = 16 * 1024 * 1024
MAX_CONNECTION_WINDOW_GROWTH = 128 * 1024 * 1024
# A forwarded socket is read before its channel is confirmed (no pause/resume per connection); past this much
# buffered, reading pauses until the channel opens.
MAX_EARLY_SOCKET_BYTES = 256 * 1024
# conduitd as root serving another user: sockets the user's helper makes ahead of that connection's forwards
# (privsep.py), per address family; also the most one helper reply carries
MAX_SPARE_SOCKETS = 16
# A forward's first bytes sent inside its CHANNEL_OPEN (messages.OPEN_DATA_EXTENSION); a server refuses more.
MAX_OPEN_DATA = 32 * 1024

# Keys and ssh-agent, as OpenSSH's SSH_RSA_MINIMUM_MODULUS_SIZE, SSHBUF_MAX_BIGNUM, AGENT_MAX_LEN and
# MAX_AGENT_IDENTITIES
RSA_MIN_BITS = 1024
RSA_MAX_BITS = 16384
MAX_AGENT_MESSAGE = 256 * 1024
MAX_AGENT_IDENTITIES = 2048
AGENT_TIMEOUT = 30.0  # seconds for one agent request (it may prompt the user for confirmation)

MAX_REMOTE_LISTENERS = 256  # tcpip-forward / streamlocal-forward listeners one connection may hold open

# Sessions (session_server.py, ttymodes.py)
MAX_ACCEPTED_ENV = 64  # env requests a peer may make stick on one channel (LC_* is an open set)
MAX_TERMINAL_MODES = 256  # opcodes in one pty-req; the RFC defines fewer than 80
KILL_GRACE = 2.0  # seconds between SIGHUP and SIGKILL when a channel closes under a running process
PTY_DRAIN_GRACE = 0.5  # seconds to keep reading a pty after its process exited (a daemon may hold the slave)
