/*
 * eventswarm-runner: PID 1 of a warm function container (docs/warm.md).
 *
 * It waits for batches on stdin (the container's attach socket) and runs the image's own program
 * once per batch, with the input document on stdin and in $EVENTSWARM_INPUT; it sends back the
 * program's stdout and stderr as they come and, at the end, its exit status. Between batches it
 * kills whatever the batch left running and empties /tmp, so batch 2 never sees batch 1.
 *
 * The control channel is out of the function's reach. The runner splits in two at start:
 *   - the face stays PID 1 and holds no part of the channel: its stdin is /dev/null and its stdout and
 *     stderr are pipes to the core, so the Docker idiom `exec >/proc/1/fd/1` reaches the running batch's
 *     stdout (and /proc/1/fd/2 its stderr), as logging;
 *   - the core, its child, holds the channel (the attach socket's stdin and stdout) and runs the batches.
 *     It is not dumpable, so /proc/<core>/fd and /proc/<core>/mem are closed to the function's processes
 *     (they have no CAP_SYS_PTRACE: every capability is dropped), and it never lets them inherit the channel.
 *     It ignores the signals it can (a function's `kill -TERM -1` leaves it be); a SIGKILL ends the container.
 * Each batch's 'G' carries a token that its 'B' and 'X' echo: the daemon refuses frames that are not the batch's.
 *
 * Frames, both ways: one type byte, a 4-byte big-endian payload length, the payload.
 *   daemon -> runner  'A' one argv element   'E' one NAME=value   'I' the input document
 *                     'T' "<timeout_ms> <grace_ms>"   'G' "<token>": run what came since the last 'G'
 *   runner -> daemon  'R' ready (its version)   'B' "<token>": the batch of that 'G' begins
 *                     'O' stdout bytes   'E' stderr bytes
 *                     'X' "<token> <status> <timed_out> <oom_kills>": the batch's token from its 'G'; status is
 *                     the exit code, or 128 + the signal that ended the program; oom_kills counts the
 *                     cgroup's OOM kills meanwhile.
 * End of stdin (the daemon is gone): the runner kills everything and exits 0.
 *
 * Static (musl), no libc needed in the image: built by scripts/runner.sh in `make install`.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define VERSION "eventswarm-runner 2"
#define INPUT_DIR "/run/eventswarm"
#define INPUT_PATH INPUT_DIR "/input.json"
#define MAX_ITEMS 4096          /* argv and env entries per batch */
#define MAX_FRAME (1u << 20)    /* an 'A', 'E' or 'T' payload */
#define CHUNK 65536
#define MAX_TOKEN 64            /* a 'G' payload */

extern char **environ;

static int face_out = -1, face_err = -1; /* the read ends of the face's stdout and stderr */
static char inbuf[CHUNK];
static size_t in_start, in_end;
static int in_eof;

static void die(const char *what) {
    dprintf(2, "eventswarm-runner: %s: %s\n", what, strerror(errno));
    kill(-1, SIGKILL);
    _exit(2);
}

static void write_all(int fd, struct iovec *iov, int count) {
    while (count) {
        ssize_t n = writev(fd, iov, count);
        if (n < 0) {
            if (errno == EINTR) continue;
            /* the daemon is gone: nobody reads what we say any more */
            kill(-1, SIGKILL);
            _exit(0);
        }
        while (count && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            count--;
        }
        if (count) {
            iov->iov_base = (char *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
}

static unsigned char held[5 + MAX_TOKEN];
static size_t held_size;

/* A frame in one write, after the frame held back (if any). */
static void send_frame(char type, const void *data, size_t size) {
    unsigned char head[5] = {(unsigned char)type, (unsigned char)(size >> 24), (unsigned char)(size >> 16),
                             (unsigned char)(size >> 8), (unsigned char)size};
    struct iovec iov[3];
    int count = 0;
    if (held_size) iov[count++] = (struct iovec){held, held_size};
    iov[count++] = (struct iovec){head, sizeof head};
    if (size) iov[count++] = (struct iovec){(void *)data, size};
    write_all(1, iov, count);
    held_size = 0;
}

/* A small frame sent with the next one (the batch's 'B' goes with its first output, or its 'X'). */
static void hold_frame(char type, const char *data, size_t size) {
    held[0] = (unsigned char)type;
    held[1] = (unsigned char)(size >> 24);
    held[2] = (unsigned char)(size >> 16);
    held[3] = (unsigned char)(size >> 8);
    held[4] = (unsigned char)size;
    memcpy(held + 5, data, size);
    held_size = 5 + size;
}

/* Fill the input buffer; returns 0 at end of input. */
static int fill(void) {
    if (in_start < in_end) return 1;
    if (in_eof) return 0;
    for (;;) {
        ssize_t n = read(0, inbuf, sizeof inbuf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            in_eof = 1;
            return 0;
        }
        in_start = 0;
        in_end = (size_t)n;
        return 1;
    }
}

/* Copy the next `size` bytes of input to `out` (a buffer) or `fd`; returns 0 if the input ended first. */
static int take(size_t size, char *out, int fd) {
    while (size) {
        if (!fill()) return 0;
        size_t n = in_end - in_start < size ? in_end - in_start : size;
        if (out) {
            memcpy(out, inbuf + in_start, n);
            out += n;
        } else if (fd >= 0) {
            const char *p = inbuf + in_start;
            size_t left = n;
            while (left) {
                ssize_t w = write(fd, p, left);
                if (w < 0) {
                    if (errno == EINTR) continue;
                    die("cannot write the input file");
                }
                p += w;
                left -= (size_t)w;
            }
        }
        in_start += n;
        size -= n;
    }
    return 1;
}

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* The container cgroup's OOM kills so far (cgroup v2, then v1); 0 where neither can be read. */
static long oom_kills(void) {
    static const char *paths[] = {"/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"};
    for (size_t i = 0; i < 2; i++) {
        FILE *f = fopen(paths[i], "r");
        if (!f) continue;
        char key[64];
        long value;
        long found = 0;
        while (fscanf(f, "%63s %ld", key, &value) == 2)
            if (strcmp(key, "oom_kill") == 0) found = value;
        fclose(f);
        return found;
    }
    return 0;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st;
    if (ftw->level == 0) return 0; /* /tmp itself stays */
    if (flag == FTW_DP) rmdir(path);
    else unlink(path);
    return 0;
}

/* Make each directory under /tmp writable by us first (a batch may leave a read-only one). */
static int open_up(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)ftw;
    if (flag == FTW_D && !(st->st_mode & S_IWUSR)) chmod(path, st->st_mode | S_IRWXU);
    return 0;
}

static void wipe_tmp(void) {
    nftw("/tmp", open_up, 32, FTW_PHYS | FTW_MOUNT);
    nftw("/tmp", remove_entry, 32, FTW_DEPTH | FTW_PHYS | FTW_MOUNT);
}

/* Reap every child that has ended; note the batch program's status. */
static void reap(pid_t program, int *status, int *ended) {
    for (;;) {
        int st;
        pid_t pid = waitpid(-1, &st, WNOHANG);
        if (pid <= 0) return;
        if (pid == program) {
            *status = st;
            *ended = 1;
        }
    }
}

/* Build the program's environment: ours (the image's and the function's), with the batch's entries over it. */
static char **batch_env(char **entries, size_t count) {
    size_t base = 0;
    while (environ[base]) base++;
    char **env = calloc(base + count + 1, sizeof *env);
    if (!env) die("out of memory");
    size_t n = 0;
    for (size_t i = 0; i < base; i++) {
        const char *eq = strchr(environ[i], '=');
        size_t key = eq ? (size_t)(eq - environ[i]) + 1 : strlen(environ[i]);
        int replaced = 0;
        for (size_t j = 0; j < count && !replaced; j++) replaced = strncmp(entries[j], environ[i], key) == 0;
        if (!replaced) env[n++] = environ[i];
    }
    for (size_t j = 0; j < count; j++) env[n++] = entries[j];
    env[n] = NULL;
    return env;
}

/* What the face's pipes hold now (writes to /proc/1/fd/1 and /proc/1/fd/2), sent as the batch's 'O' and 'E'
 * frames (or dropped, between batches): they are non-blocking, and their write ends stay open in the face. */
static void drain_face(int send) {
    static char chunk[CHUNK];
    int fds[2] = {face_out, face_err};
    for (int i = 0; i < 2; i++) {
        for (;;) {
            ssize_t n = read(fds[i], chunk, sizeof chunk);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) break;
            if (send) send_frame(i == 0 ? 'O' : 'E', chunk, (size_t)n);
        }
    }
}

static void run_batch(char **argv, char **env, uint64_t timeout_ms, uint64_t grace_ms, int sigfd, const char *token) {
    int out[2], err[2];
    if (pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) die("cannot make pipes");
    long ooms = oom_kills();
    sigset_t all;
    sigemptyset(&all);
    pid_t pid = fork();
    if (pid < 0) die("cannot fork");
    if (pid == 0) {
        setpgid(0, 0);
        sigprocmask(SIG_SETMASK, &all, NULL);
        for (int sig = 1; sig < 32; sig++) signal(sig, SIG_DFL); /* (the core ignores most: the program does not) */
        int in = open(INPUT_PATH, O_RDONLY);
        if (in < 0 || dup2(in, 0) < 0 || dup2(out[1], 1) < 0 || dup2(err[1], 2) < 0) _exit(126);
        if (in > 2) close(in);
        environ = env;
        execvp(argv[0], argv);
        int code = errno == ENOENT ? 127 : 126;
        dprintf(2, "eventswarm-runner: cannot run '%s': %s\n", argv[0], strerror(errno));
        _exit(code);
    }
    setpgid(pid, pid);
    close(out[1]);
    close(err[1]);
    struct pollfd fds[6] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}, {sigfd, POLLIN, 0}, {0, POLLIN, 0},
                            {face_out, POLLIN, 0}, {face_err, POLLIN, 0}};
    uint64_t deadline = now_ms() + timeout_ms, kill_at = 0;
    int status = 0, ended = 0, timed_out = 0, open_pipes = 2;
    static char chunk[CHUNK];
    while (open_pipes || !ended) {
        uint64_t now = now_ms();
        if (!ended && !timed_out && now >= deadline) {
            timed_out = 1;
            kill(-pid, SIGTERM);
            kill_at = now + grace_ms;
        }
        if (!ended && kill_at && now >= kill_at) {
            kill(-pid, SIGKILL);
            kill(-1, SIGKILL);
            kill_at = 0;
        }
        uint64_t next = ended ? UINT64_MAX : (timed_out ? (kill_at ? kill_at : UINT64_MAX) : deadline);
        int wait = next == UINT64_MAX ? 1000 : (int)(next > now ? (next - now < 1000 ? next - now : 1000) : 0);
        fds[3].fd = in_eof ? -1 : 0;
        int ready = poll(fds, 6, wait);
        if (ready < 0) {
            if (errno == EINTR) continue;
            die("poll");
        }
        for (int i = 0; i < 2; i++) {
            if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            ssize_t n = read(fds[i].fd, chunk, sizeof chunk);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) {
                close(fds[i].fd);
                fds[i].fd = -1;
                open_pipes--;
            } else {
                send_frame(i == 0 ? 'O' : 'E', chunk, (size_t)n);
            }
        }
        if ((fds[4].revents | fds[5].revents) & POLLIN) drain_face(1);
        if (fds[2].revents & POLLIN) {
            struct signalfd_siginfo info;
            while (read(sigfd, &info, sizeof info) == sizeof info) {}
            int was = ended;
            reap(pid, &status, &ended);
            if (ended && !was) {
                /* The batch is over: what it started in the background goes with it (and closes its pipes). */
                kill(-pid, SIGKILL);
                kill(-1, SIGKILL);
            }
        }
        if (fds[3].fd >= 0 && (fds[3].revents & (POLLIN | POLLHUP | POLLERR))) {
            /* Nothing is sent while a batch runs: readable means the daemon is gone. */
            if (in_start >= in_end) {
                ssize_t n = read(0, inbuf, sizeof inbuf);
                if (n <= 0) {
                    kill(-1, SIGKILL);
                    _exit(0);
                }
                in_start = 0;
                in_end = (size_t)n;
            }
            fds[3].fd = -1; /* keep it for the next batch */
        }
    }
    /* Everything the batch started is dead or dying: wait for the last of it. */
    for (;;) {
        int st;
        pid_t gone = waitpid(-1, &st, 0);
        if (gone < 0 && errno == EINTR) continue;
        if (gone <= 0) break;
    }
    drain_face(1); /* (nothing of the batch is left to write there) */
    unlink(INPUT_PATH);
    wipe_tmp();
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    char report[MAX_TOKEN + 64];
    int size = snprintf(report, sizeof report, "%s %d %d %ld", token, code, timed_out, oom_kills() - ooms);
    send_frame('X', report, (size_t)size);
}

/* PID 1 after the split: holds no part of the channel, reaps what comes to it, and ends with the core. */
static void face(pid_t core) {
    for (;;) {
        int st;
        pid_t gone = wait(&st);
        if (gone < 0 && errno == EINTR) continue;
        if (gone < 0) _exit(0);
        if (gone == core) {
            kill(-1, SIGKILL);
            while (wait(NULL) > 0 || errno == EINTR) {}
            _exit(WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
        }
    }
}

/* Split: the parent stays PID 1 as the face (see the top of this file), the child goes on as the core. */
static void split(void) {
    int out[2], err[2], ready[2];
    /* Not dumpable from here on: the channel's descriptors are never open to the function's processes. */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0) die("cannot make the runner non-dumpable");
    if (pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0 || pipe2(ready, O_CLOEXEC) < 0) die("cannot make pipes");
    pid_t core = fork();
    if (core < 0) die("cannot fork");
    if (core > 0) {
        int null = open("/dev/null", O_RDWR);
        if (null < 0 || dup2(null, 0) < 0 || dup2(out[1], 1) < 0 || dup2(err[1], 2) < 0) die("cannot set up PID 1");
        for (int fd = 3; fd < 4096; fd++)
            if (fd != ready[1]) close(fd); /* the pipes' other ends: nothing of the channel stays */
        if (prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) < 0) _exit(2); /* /proc/1/fd/1 and /2 open as logging */
        close(ready[1]); /* the core may start: PID 1 is safe to show */
        face(core);
    }
    close(out[1]);
    close(err[1]);
    close(ready[1]);
    char byte;
    while (read(ready[0], &byte, 1) < 0 && errno == EINTR) {}
    close(ready[0]);
    face_out = out[0];
    face_err = err[0];
    if (fcntl(face_out, F_SETFL, O_NONBLOCK) < 0 || fcntl(face_err, F_SETFL, O_NONBLOCK) < 0) die("fcntl");
    /* Orphans of a batch come to the core (it kills and reaps them), not to the face. */
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0) die("cannot become a subreaper");
    prctl(PR_SET_NAME, "eventswarm-core", 0, 0, 0);
    for (int sig = 1; sig < 32; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP || sig == SIGCHLD || sig == SIGSEGV || sig == SIGBUS || sig == SIGFPE
            || sig == SIGILL || sig == SIGABRT || sig == SIGTRAP || sig == SIGSYS)
            continue;
        signal(sig, SIG_IGN);
    }
}

int main(int argc, char **argv) {
    (void)argc;
    (void)argv;
    if (getpid() != 1) {
        /* kill(-1) outside a container's PID namespace would end every process this user may signal */
        dprintf(2, "eventswarm-runner: runs only as PID 1 of a container\n");
        return 2;
    }
    split();
    signal(SIGPIPE, SIG_IGN);
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    int sigfd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sigfd < 0) die("signalfd");
    send_frame('R', VERSION, sizeof VERSION - 1);

    char *args[MAX_ITEMS + 1], *envs[MAX_ITEMS];
    size_t nargs = 0, nenvs = 0;
    uint64_t timeout_ms = 300000, grace_ms = 5000;
    for (;;) {
        unsigned char head[5];
        if (!take(sizeof head, (char *)head, -1)) break;
        uint32_t size = (uint32_t)head[1] << 24 | (uint32_t)head[2] << 16 | (uint32_t)head[3] << 8 | head[4];
        char type = (char)head[0];
        if (type == 'I') {
            int fd = open(INPUT_PATH, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
            if (fd < 0) die("cannot open " INPUT_PATH);
            int whole = take(size, NULL, fd);
            close(fd);
            if (!whole) break;
            continue;
        }
        if (size > MAX_FRAME) {
            dprintf(2, "eventswarm-runner: a '%c' frame of %u bytes is over the limit\n", type, size);
            break;
        }
        char *payload = malloc(size + 1);
        if (!payload) die("out of memory");
        if (!take(size, payload, -1)) break;
        payload[size] = 0;
        if (type == 'A' && nargs < MAX_ITEMS) {
            args[nargs++] = payload;
        } else if (type == 'E' && nenvs < MAX_ITEMS) {
            envs[nenvs++] = payload;
        } else if (type == 'T') {
            unsigned long long t = 0, g = 0;
            sscanf(payload, "%llu %llu", &t, &g);
            timeout_ms = t;
            grace_ms = g;
            free(payload);
        } else if (type == 'G') {
            char token[MAX_TOKEN + 1];
            snprintf(token, sizeof token, "%s", payload);
            free(payload);
            if (strlen(token) != size || strpbrk(token, " \t\n")) {
                dprintf(2, "eventswarm-runner: a 'G' frame whose token is not one word of at most %d bytes\n", MAX_TOKEN);
                break;
            }
            drain_face(0); /* (nothing runs between batches: what is there is no batch's) */
            hold_frame('B', token, strlen(token));
            if (nargs == 0) {
                const char *say = "eventswarm-runner: no program to run\n";
                send_frame('E', say, strlen(say));
                char report[MAX_TOKEN + 16];
                int n = snprintf(report, sizeof report, "%s 127 0 0", token);
                send_frame('X', report, (size_t)n);
            } else {
                args[nargs] = NULL;
                char **env = batch_env(envs, nenvs);
                run_batch(args, env, timeout_ms, grace_ms, sigfd, token);
                free(env);
            }
            for (size_t i = 0; i < nargs; i++) free(args[i]);
            for (size_t i = 0; i < nenvs; i++) free(envs[i]);
            nargs = nenvs = 0;
        } else {
            free(payload);
        }
    }
    kill(-1, SIGKILL);
    return 0;
}
