// vr-vsockcheck: the ends of the connections of the snapshot/restore scenario
// (integration/tests/snapshot_e2e.rs): a connection is opened, one line goes each way, and then
// it is held in a blocking recv() or send() (or, on the host side, until the peer closes it), and
// the tool prints exactly how that ended (the errno's name). Also prints the guest's CID as its
// kernel knows it (IOCTL_VM_SOCKETS_GET_LOCAL_CID on /dev/vsock).
//
// usage:
//   vr-vsockcheck cid
//   vr-vsockcheck connect CID PORT LINE [recv-block|send-block]     (AF_VSOCK, guests only)
//   vr-vsockcheck serve PORT REPLY [recv-block] [then REPLY2]       (AF_VSOCK, guests only)
//   vr-vsockcheck unix-connect PATH PORT LINE [hold]                (hybrid vsock client)
//   vr-vsockcheck unix-serve PATH REPLY [hold]                      (a host service)
//
// Every line it prints on stdout starts with the number of the connection it is about (1, or 2
// for the second connection `serve ... then` accepts):
//   N listening port=P | N listening path=P
//   N connected local=CID:PORT peer=CID:PORT  (connect)     N accepted local=... peer=... (serve)
//   N ok-line=OK <port>                        (unix-connect: the device's answer to CONNECT)
//   N got=<line>                               (the line the peer sent)
//   N blocking recv | N blocked-send total=<bytes sent before the blocking send>
//   N ended recv errno=<NAME> | N ended recv eof | N ended recv data=<bytes>
//   N ended send errno=<NAME> total=<bytes>
//   N ended eof unread=<bytes> | N ended errno=<NAME> unread=<bytes>   (hold: the peer closed)
//   N closed
//   N error <what> errno=<NAME>                (then exit status 1)
// connect sends LINE, then reads one line; serve reads one line, then sends REPLY, in which %c
// stands for the connection's local CID (getsockname: the CID the device addressed it to).
// recv-block: one blocking recv() (SO_RCVTIMEO 1200 s), whose result is printed.
// send-block: sends until no credit is left (non-blocking sends of 4096 bytes until EAGAIN), then
// one blocking send() of 1 byte (SO_SNDTIMEO 1200 s); when that returns 1 the filling goes on
// (credit came back), else its error is printed. A blocking send() of 1 byte reports a reset as
// ECONNRESET (a send that had written some bytes before it blocked would return their count).
// hold: waits (poll, 1200 s at most) until the peer closes, without reading, then reads what is
// left and prints how the stream ended. The AF_VSOCK connect timeout is
// $VR_VSOCK_CONNECT_TIMEOUT seconds (default 60), as vr-socat's.
//
// The AF_VSOCK modes refuse to run when VSOCK_ROUTER_FORBID_AF_VSOCK is set (on the test machine
// itself); the unix modes open only AF_UNIX sockets. Built statically by build-tools.sh; in the
// KVM host's and the inner guest's /vr/bin.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define HOLD_SECS 1200
#define MAX_LINE 256
// send-block gives up (and says so) after this much: no device grants that much credit to a
// peer that does not read.
#define MAX_FILL (256L << 20)

static int conn_no = 1;

static const char *errname(int e) {
	const char *n = strerrorname_np(e);
	return n ? n : "E?";
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
	va_list ap;
	printf("%d ", conn_no);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
}

static int fail(const char *what) {
	say("error %s errno=%s", what, errname(errno));
	return 1;
}

static int usage(void) {
	fprintf(stderr,
		"usage: vr-vsockcheck cid\n"
		"       vr-vsockcheck connect CID PORT LINE [recv-block|send-block]\n"
		"       vr-vsockcheck serve PORT REPLY [recv-block] [then REPLY2]\n"
		"       vr-vsockcheck unix-connect PATH PORT LINE [hold]\n"
		"       vr-vsockcheck unix-serve PATH REPLY [hold]\n");
	return 2;
}

static int parse_u32(const char *s, unsigned *out) {
	char *end;
	errno = 0;
	unsigned long v = strtoul(s, &end, 10);
	if (errno || end == s || *end || v > 0xffffffffUL) return -1;
	*out = (unsigned)v;
	return 0;
}

static int set_timeo(int fd, int opt, int secs) {
	struct timeval tv = {.tv_sec = secs};
	return setsockopt(fd, SOL_SOCKET, opt, &tv, sizeof(tv));
}

// Reads one line byte by byte (nothing past its newline), without the newline.
static int read_line(int fd, char *buf, size_t size) {
	size_t n = 0;
	for (;;) {
		char c;
		ssize_t r = recv(fd, &c, 1, 0);
		if (r < 0 && errno == EINTR) continue;
		if (r < 0) return -1;
		if (r == 0) {
			errno = ENODATA; // EOF before the newline
			return -1;
		}
		if (c == '\n') break;
		if (n + 1 >= size) {
			errno = EMSGSIZE;
			return -1;
		}
		buf[n++] = c;
	}
	buf[n] = 0;
	return 0;
}

static int send_all(int fd, const char *buf, size_t len) {
	while (len > 0) {
		ssize_t w = send(fd, buf, len, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR) continue;
		if (w < 0) return -1;
		buf += w;
		len -= (size_t)w;
	}
	return 0;
}

// LINE with %c replaced by the local CID of fd, and a newline.
static int send_line(int fd, const char *line) {
	char out[MAX_LINE + 16];
	size_t n = 0;
	for (const char *p = line; *p; p++) {
		if (p[0] == '%' && p[1] == 'c') {
			struct sockaddr_vm a;
			socklen_t len = sizeof(a);
			if (getsockname(fd, (struct sockaddr *)&a, &len) < 0) return -1;
			n += (size_t)snprintf(out + n, sizeof(out) - n, "%u", a.svm_cid);
			p++;
		} else {
			out[n++] = *p;
		}
		if (n >= MAX_LINE) {
			errno = EMSGSIZE;
			return -1;
		}
	}
	out[n++] = '\n';
	return send_all(fd, out, n);
}

static int vsock_forbidden(void) {
	if (getenv("VSOCK_ROUTER_FORBID_AF_VSOCK")) {
		fprintf(stderr, "vr-vsockcheck: refusing AF_VSOCK: VSOCK_ROUTER_FORBID_AF_VSOCK is set "
				"(this is the test machine, not a guest)\n");
		return 1;
	}
	return 0;
}

static void print_addrs(const char *what, int fd) {
	struct sockaddr_vm l, p;
	socklen_t ll = sizeof(l), pl = sizeof(p);
	if (getsockname(fd, (struct sockaddr *)&l, &ll) < 0 || getpeername(fd, (struct sockaddr *)&p, &pl) < 0) {
		say("%s local=? peer=? (errno=%s)", what, errname(errno));
		return;
	}
	say("%s local=%u:%u peer=%u:%u", what, l.svm_cid, l.svm_port, p.svm_cid, p.svm_port);
}

static int recv_block(int fd) {
	if (set_timeo(fd, SO_RCVTIMEO, HOLD_SECS) < 0) return fail("SO_RCVTIMEO");
	char buf[4096];
	say("blocking recv");
	ssize_t r;
	do {
		r = recv(fd, buf, sizeof(buf), 0);
	} while (r < 0 && errno == EINTR);
	if (r < 0)
		say("ended recv errno=%s", errname(errno));
	else if (r == 0)
		say("ended recv eof");
	else
		say("ended recv data=%zd", r);
	return 0;
}

static int send_block(int fd) {
	if (set_timeo(fd, SO_SNDTIMEO, HOLD_SECS) < 0) return fail("SO_SNDTIMEO");
	static char chunk[4096];
	memset(chunk, 'f', sizeof(chunk));
	long total = 0;
	while (total < MAX_FILL) {
		ssize_t w = send(fd, chunk, sizeof(chunk), MSG_DONTWAIT | MSG_NOSIGNAL);
		if (w > 0) {
			total += w;
			continue;
		}
		if (w < 0 && errno == EINTR) continue;
		if (w < 0 && errno != EAGAIN) {
			say("ended send errno=%s total=%ld", errname(errno), total);
			return 0;
		}
		// No credit left: one blocking send of 1 byte.
		say("blocked-send total=%ld", total);
		do {
			w = send(fd, chunk, 1, MSG_NOSIGNAL);
		} while (w < 0 && errno == EINTR);
		if (w < 0) {
			say("ended send errno=%s total=%ld", errname(errno), total);
			return 0;
		}
		total += w;
	}
	say("error send-block never blocked total=%ld", total);
	return 1;
}

static int vsock_socket(void) { return socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0); }

static int do_cid(void) {
	if (vsock_forbidden()) return 1;
	int fd = open("/dev/vsock", O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		fprintf(stderr, "vr-vsockcheck: open /dev/vsock: %s\n", errname(errno));
		return 1;
	}
	unsigned cid;
	if (ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) < 0) {
		fprintf(stderr, "vr-vsockcheck: IOCTL_VM_SOCKETS_GET_LOCAL_CID: %s\n", errname(errno));
		return 1;
	}
	printf("%u\n", cid);
	return 0;
}

static int do_connect(int argc, char **argv) {
	unsigned cid, port;
	if (argc < 5 || argc > 6 || parse_u32(argv[2], &cid) || parse_u32(argv[3], &port)) return usage();
	const char *then = argc == 6 ? argv[5] : "";
	if (*then && strcmp(then, "recv-block") && strcmp(then, "send-block")) return usage();
	if (vsock_forbidden()) return 1;
	int fd = vsock_socket();
	if (fd < 0) return fail("socket");
	long secs = 60;
	const char *t = getenv("VR_VSOCK_CONNECT_TIMEOUT");
	if (t && *t) secs = strtol(t, NULL, 10);
	struct timeval tv = {.tv_sec = secs};
	if (setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD, &tv, sizeof(tv)) < 0)
		return fail("SO_VM_SOCKETS_CONNECT_TIMEOUT");
	struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) return fail("connect");
	print_addrs("connected", fd);
	if (set_timeo(fd, SO_RCVTIMEO, HOLD_SECS) < 0) return fail("SO_RCVTIMEO");
	if (send_line(fd, argv[4]) < 0) return fail("send");
	char line[MAX_LINE];
	if (read_line(fd, line, sizeof(line)) < 0) return fail("recv");
	say("got=%s", line);
	if (!strcmp(then, "recv-block")) return recv_block(fd);
	if (!strcmp(then, "send-block")) return send_block(fd);
	close(fd);
	say("closed");
	return 0;
}

// One accepted connection: its line in, REPLY out.
static int serve_one(int lfd, const char *reply, int *out_fd) {
	int fd;
	do {
		fd = accept(lfd, NULL, NULL);
	} while (fd < 0 && errno == EINTR);
	if (fd < 0) return fail("accept");
	print_addrs("accepted", fd);
	if (set_timeo(fd, SO_RCVTIMEO, HOLD_SECS) < 0) return fail("SO_RCVTIMEO");
	char line[MAX_LINE];
	if (read_line(fd, line, sizeof(line)) < 0) return fail("recv");
	say("got=%s", line);
	if (send_line(fd, reply) < 0) return fail("send");
	*out_fd = fd;
	return 0;
}

static int do_serve(int argc, char **argv) {
	unsigned port;
	if (argc < 4 || parse_u32(argv[2], &port)) return usage();
	int block = 0;
	const char *reply2 = NULL;
	int i = 4;
	if (i < argc && !strcmp(argv[i], "recv-block")) {
		block = 1;
		i++;
	}
	if (i + 1 < argc && !strcmp(argv[i], "then")) {
		reply2 = argv[i + 1];
		i += 2;
	}
	if (i != argc) return usage();
	if (vsock_forbidden()) return 1;
	int lfd = vsock_socket();
	if (lfd < 0) return fail("socket");
	struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
	if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) < 0) return fail("bind");
	if (listen(lfd, 8) < 0) return fail("listen");
	// accept() waits at most this long (the listener's receive timeout).
	if (set_timeo(lfd, SO_RCVTIMEO, HOLD_SECS) < 0) return fail("SO_RCVTIMEO");
	say("listening port=%u", port);
	int fd;
	if (serve_one(lfd, argv[3], &fd)) return 1;
	if (block) recv_block(fd);
	close(fd);
	if (!reply2) {
		say("closed");
		return 0;
	}
	conn_no = 2;
	if (serve_one(lfd, reply2, &fd)) return 1;
	close(fd);
	say("closed");
	return 0;
}

static int unix_addr(const char *path, struct sockaddr_un *a) {
	memset(a, 0, sizeof(*a));
	a->sun_family = AF_UNIX;
	if (strlen(path) >= sizeof(a->sun_path)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	strcpy(a->sun_path, path);
	return 0;
}

// Waits until the peer closes (without reading), then reads what is left.
static int hold(int fd) {
	struct pollfd p = {.fd = fd, .events = POLLRDHUP};
	int r;
	do {
		r = poll(&p, 1, HOLD_SECS * 1000);
	} while (r < 0 && errno == EINTR);
	if (r < 0) return fail("poll");
	if (r == 0) {
		say("ended timeout after %d s", HOLD_SECS);
		return 1;
	}
	long unread = 0;
	char buf[65536];
	for (;;) {
		ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (n > 0) {
			unread += n;
			continue;
		}
		if (n < 0 && errno == EINTR) continue;
		if (n == 0)
			say("ended eof unread=%ld", unread);
		else if (errno == EAGAIN)
			say("ended open unread=%ld (poll revents=0x%x)", unread, p.revents);
		else
			say("ended errno=%s unread=%ld", errname(errno), unread);
		return 0;
	}
}

static int do_unix_connect(int argc, char **argv) {
	unsigned port;
	if (argc < 5 || argc > 6 || parse_u32(argv[3], &port)) return usage();
	int keep = argc == 6;
	if (keep && strcmp(argv[5], "hold")) return usage();
	struct sockaddr_un a;
	if (unix_addr(argv[2], &a) < 0) return fail("path");
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) return fail("socket");
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) return fail("connect");
	if (set_timeo(fd, SO_RCVTIMEO, HOLD_SECS) < 0) return fail("SO_RCVTIMEO");
	char line[MAX_LINE];
	snprintf(line, sizeof(line), "CONNECT %u\n", port);
	if (send_all(fd, line, strlen(line)) < 0) return fail("send CONNECT");
	if (read_line(fd, line, sizeof(line)) < 0) return fail("recv OK");
	say("ok-line=%s", line);
	if (strncmp(line, "OK ", 3)) return 1;
	if (send_all(fd, argv[4], strlen(argv[4])) < 0 || send_all(fd, "\n", 1) < 0) return fail("send");
	if (read_line(fd, line, sizeof(line)) < 0) return fail("recv");
	say("got=%s", line);
	if (keep) return hold(fd);
	close(fd);
	say("closed");
	return 0;
}

static int do_unix_serve(int argc, char **argv) {
	if (argc < 4 || argc > 5) return usage();
	int keep = argc == 5;
	if (keep && strcmp(argv[4], "hold")) return usage();
	struct sockaddr_un a;
	if (unix_addr(argv[2], &a) < 0) return fail("path");
	int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lfd < 0) return fail("socket");
	if (bind(lfd, (struct sockaddr *)&a, sizeof(a)) < 0) return fail("bind");
	if (listen(lfd, 8) < 0) return fail("listen");
	say("listening path=%s", argv[2]);
	struct pollfd p = {.fd = lfd, .events = POLLIN};
	int r;
	do {
		r = poll(&p, 1, HOLD_SECS * 1000);
	} while (r < 0 && errno == EINTR);
	if (r <= 0) {
		if (r == 0) errno = ETIMEDOUT;
		return fail("accept");
	}
	int fd = accept(lfd, NULL, NULL);
	if (fd < 0) return fail("accept");
	say("accepted");
	close(lfd);
	if (set_timeo(fd, SO_RCVTIMEO, HOLD_SECS) < 0) return fail("SO_RCVTIMEO");
	char line[MAX_LINE];
	if (read_line(fd, line, sizeof(line)) < 0) return fail("recv");
	say("got=%s", line);
	if (send_all(fd, argv[3], strlen(argv[3])) < 0 || send_all(fd, "\n", 1) < 0) return fail("send");
	if (keep) return hold(fd);
	close(fd);
	say("closed");
	return 0;
}

int main(int argc, char **argv) {
	if (argc < 2) return usage();
	const char *mode = argv[1];
	if (!strcmp(mode, "cid") && argc == 2) return do_cid();
	if (!strcmp(mode, "connect")) return do_connect(argc, argv);
	if (!strcmp(mode, "serve")) return do_serve(argc, argv);
	if (!strcmp(mode, "unix-connect")) return do_unix_connect(argc, argv);
	if (!strcmp(mode, "unix-serve")) return do_unix_serve(argc, argv);
	return usage();
}
