/*
 * The ceiling: a bare librdkafka producer that sends given messages as fast as it can, with the
 * same delivery settings as Sluice (acks=all, idempotence, linger.ms=5), and waits for every
 * delivery report. Prints one JSON line with messages/s and MB/s.
 *
 *   raw_producer -b BOOTSTRAP -f MESSAGES [-s SECONDS] [-n COUNT]
 *
 * MESSAGES holds records, each: u16 topic length, topic, i32 key length (-1: no key), key,
 * u32 value length, value (integers big-endian). The records are sent in order, cycling through
 * the file until COUNT messages (default: one pass) or SECONDS have been sent.
 * Build: gcc -O2 -o raw_producer raw_producer.c -lrdkafka
 */
#include <librdkafka/rdkafka.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct { rd_kafka_topic_t *topic; const char *key; int32_t key_len; const char *value; uint32_t value_len; } record_t;

static long delivered, failed;
static long long delivered_bytes;
static char first_error[256];

static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque) {
    (void)rk; (void)opaque;
    if (m->err) {
        if (!failed++) snprintf(first_error, sizeof first_error, "%s", rd_kafka_err2str(m->err));
    } else {
        delivered++;
        delivered_bytes += (long long)m->len + m->key_len;
    }
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static uint32_t be32(const unsigned char *p) { return (uint32_t)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3]; }

static void die(const char *what) { fprintf(stderr, "raw_producer: %s\n", what); exit(1); }

static void set(rd_kafka_conf_t *conf, const char *k, const char *v) {
    char err[256];
    if (rd_kafka_conf_set(conf, k, v, err, sizeof err) != RD_KAFKA_CONF_OK) die(err);
}

/* Reads the whole file; topics are looked up by name in a small table of handles. */
static record_t *load(rd_kafka_t *rk, const char *path, long *count) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open the messages file");
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    rewind(f);
    unsigned char *buf = malloc(size + 1);
    if (!buf || fread(buf, 1, size, f) != (size_t)size) die("cannot read the messages file");
    fclose(f);
    long cap = 1024, n = 0;
    record_t *recs = malloc(cap * sizeof *recs);
    char *names[1024];
    rd_kafka_topic_t *handles[1024];
    int ntopics = 0;
    for (long off = 0; off < size;) {
        if (off + 2 > size) die("truncated record");
        int tlen = buf[off] << 8 | buf[off + 1];
        char *name = strndup((char *)buf + off + 2, tlen);
        off += 2 + tlen;
        int t = 0;
        while (t < ntopics && strcmp(names[t], name)) t++;
        if (t == ntopics) {
            if (ntopics == 1024) die("too many topics");
            names[t] = name;
            handles[t] = rd_kafka_topic_new(rk, name, NULL);
            ntopics++;
        } else {
            free(name);
        }
        if (off + 4 > size) die("truncated record");
        int32_t klen = (int32_t)be32(buf + off);
        off += 4;
        const char *key = klen >= 0 ? (char *)buf + off : NULL;
        off += klen > 0 ? klen : 0;
        if (off + 4 > size) die("truncated record");
        uint32_t vlen = be32(buf + off);
        off += 4;
        if ((unsigned long)off + vlen > (unsigned long)size) die("truncated record");
        if (n == cap) recs = realloc(recs, (cap *= 2) * sizeof *recs);
        recs[n++] = (record_t){handles[t], key, klen, (char *)buf + off, vlen};
        off += vlen;
    }
    *count = n;
    return recs;
}

int main(int argc, char **argv) {
    const char *bootstrap = NULL, *path = NULL;
    double seconds = 0;
    long count = 0;
    for (int c; (c = getopt(argc, argv, "b:f:s:n:")) != -1;) {
        if (c == 'b') bootstrap = optarg;
        else if (c == 'f') path = optarg;
        else if (c == 's') seconds = atof(optarg);
        else if (c == 'n') count = atol(optarg);
        else die("usage: raw_producer -b BOOTSTRAP -f MESSAGES [-s SECONDS] [-n COUNT]");
    }
    if (!bootstrap || !path) die("usage: raw_producer -b BOOTSTRAP -f MESSAGES [-s SECONDS] [-n COUNT]");

    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    set(conf, "bootstrap.servers", bootstrap);
    set(conf, "acks", "all");
    set(conf, "enable.idempotence", "true");
    set(conf, "linger.ms", "5");
    set(conf, "queue.buffering.max.messages", "1000000");
    set(conf, "queue.buffering.max.kbytes", "1048576");
    rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    char err[512];
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    if (!rk) die(err);

    long nrecs;
    record_t *recs = load(rk, path, &nrecs);
    if (nrecs == 0) die("no messages in the file");
    if (count == 0 && seconds == 0) count = nrecs;

    /* Messages point into the file buffer (no copy): it lives until the end. */
    double start = now(), deadline = seconds > 0 ? start + seconds : 1e300;
    long sent = 0;
    while ((count == 0 || sent < count) && ((sent & 1023) || now() < deadline)) {
        record_t *r = &recs[sent % nrecs];
        if (rd_kafka_produce(r->topic, RD_KAFKA_PARTITION_UA, 0, (void *)r->value, r->value_len,
                             r->key, r->key_len > 0 ? r->key_len : 0, NULL) == -1) {
            rd_kafka_resp_err_t e = rd_kafka_last_error();
            if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL) die(rd_kafka_err2str(e));
            rd_kafka_poll(rk, 1);
            continue;
        }
        sent++;
        if (!(sent & 255)) rd_kafka_poll(rk, 0);
    }
    rd_kafka_flush(rk, 120000);
    double elapsed = now() - start;
    printf("{\"sent\": %ld, \"delivered\": %ld, \"failed\": %ld, \"bytes\": %lld, \"seconds\": %.3f, "
           "\"msgs_per_s\": %.1f, \"mb_per_s\": %.2f, \"distinct_messages\": %ld, \"librdkafka\": \"%s\", "
           "\"first_error\": \"%s\"}\n",
           sent, delivered, failed, delivered_bytes, elapsed, delivered / elapsed, delivered_bytes / elapsed / 1e6,
           nrecs, rd_kafka_version_str(), first_error);
    rd_kafka_destroy(rk);
    return failed ? 2 : 0;
}
