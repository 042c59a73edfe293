#!/usr/bin/env bash
# How long a message between two processes takes on this machine when the receiver's
# CPU has been idle: the floor under every hop of a swarm token on loopback. Two
# processes ping-pong one byte over a Unix socket, 2,000 round trips per case:
#   back to back:     each ping right after the last pong;
#   both idle 2 ms:   the sender sleeps 2 ms before each ping (both processes idle);
#   sender busy 2 ms: the sender computes for 2 ms before each ping while the
#                     receiver waits, as a node waits while the previous one computes.
# Prints the median round trip (and the 10th and 90th percentiles) of each.
#   scripts/wake-latency.sh
# Needs a C compiler (cc).
set -euo pipefail
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/pingpong.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { ROUNDS = 2000 };

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* mode 0: back to back; 1: sleep before each ping; 2: spin before each ping */
static void run(const char *name, int mode) {
    int sv[2];
    char c = 'x';
    static double rtt[ROUNDS];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) { perror("socketpair"); exit(1); }
    pid_t child = fork();
    if (child == 0) {
        for (int i = 0; i < ROUNDS; i++) {
            if (read(sv[1], &c, 1) != 1 || write(sv[1], &c, 1) != 1) _exit(1);
        }
        _exit(0);
    }
    for (int i = 0; i < ROUNDS; i++) {
        if (mode == 1) usleep(2000);
        if (mode == 2) { double t0 = now_us(); while (now_us() - t0 < 2000) {} }
        double start = now_us();
        if (write(sv[0], &c, 1) != 1 || read(sv[0], &c, 1) != 1) { perror("ping"); exit(1); }
        rtt[i] = now_us() - start;
    }
    qsort(rtt, ROUNDS, sizeof rtt[0], by_value);
    printf("%-18s round trip median %6.1f us (p10 %6.1f, p90 %6.1f)\n", name,
           rtt[ROUNDS / 2], rtt[ROUNDS / 10], rtt[ROUNDS * 9 / 10]);
    close(sv[0]);
    close(sv[1]);
}

int main(void) {
    run("back to back", 0);
    run("both idle 2 ms", 1);
    run("sender busy 2 ms", 2);
    return 0;
}
C
cc -O2 -o "$work/pingpong" "$work/pingpong.c"
"$work/pingpong"
