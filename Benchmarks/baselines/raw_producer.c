/*
 * The ceiling: a bare librdkafka producer that sends given messages as fast as it can, with the
 * same delivery settings as Sluice (acks=all, idempotence, linger.ms=5), and waits for every
 * delivery report. Prints one JSON line with messages/s, MB/s and its own CPU seconds.
 *
 *   raw_producer -b BOOTSTRAP -f MESSAGES [-s SECONDS] [-n COUNT] [-r RATE] [-H] [-X NAME=VALUE]...
 *
 * MESSAGES holds records, each: u16 topic length, topic, i32 key length (-1: no key), key,
 * u32 value length, value, u16 header count, then per header u16 name length, name, i32 value
 * length (-1: null), value (integers big-endian). The records are sent in order, cycling through
 * the file until COUNT messages (default: one pass) or SECONDS have been sent.
 *
 * With -r RATE it sends RATE messages/s instead (due ones every millisecond), and first shuffles
 * the runs of consecutive records with the same topic and key (a batch's events, keyed by its
 * user) with a fixed seed: users' batches arrive interleaved, as they do over HTTP, rather than
 * in the brokers' partition order the file was copied in. That shows what librdkafka itself costs
 * at a forwarder's rate and pattern. -H sends the messages without their headers. -X sets a
 * librdkafka property (after the defaults above).
 * Build: gcc -O2 -o raw_producer raw_producer.c -lrdkafka
 */
#include <librdkafka/rdkafka.h>
#include <stdint.h>
#include <sys/resource.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    rd_kafka_topic_t *topic;
    const char *key;
    int32_t key_len;
    const char *value;
    uint32_t value_len;
    rd_kafka_headers_t *headers; /* NULL: none; copied for each message sent */
} record_t;

static rd_kafka_t *rk_global;
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
static int be16(const unsigned char *p) { return p[0] << 8 | p[1]; }

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
        const char *value = (char *)buf + off;
        off += vlen;
        if (off + 2 > size) die("truncated record");
        int nheaders = be16(buf + off);
        off += 2;
        rd_kafka_headers_t *headers = nheaders ? rd_kafka_headers_new(nheaders) : NULL;
        for (int h = 0; h < nheaders; h++) {
            if (off + 2 > size) die("truncated header");
            int nlen = be16(buf + off);
            const char *name = (char *)buf + off + 2;
            off += 2 + nlen;
            if (off + 4 > size) die("truncated header");
            int32_t hlen = (int32_t)be32(buf + off);
            off += 4;
            if (off + (hlen > 0 ? hlen : 0) > size) die("truncated header");
            rd_kafka_header_add(headers, name, nlen, hlen >= 0 ? buf + off : NULL, hlen >= 0 ? hlen : 0);
            off += hlen > 0 ? hlen : 0;
        }
        if (n == cap) recs = realloc(recs, (cap *= 2) * sizeof *recs);
        recs[n++] = (record_t){handles[t], key, klen, value, vlen, headers};
    }
    *count = n;
    return recs;
}

static int same_run(const record_t *a, const record_t *b) {
    return a->topic == b->topic && a->key_len == b->key_len && (a->key_len <= 0 || !memcmp(a->key, b->key, a->key_len));
}

/* Shuffles the runs of records with the same topic and key (fixed seed), keeping each run whole. */
static record_t *shuffle_runs(record_t *recs, long n) {
    long *starts = malloc((n + 1) * sizeof *starts), runs = 0;
    for (long i = 0; i < n; i++)
        if (i == 0 || !same_run(&recs[i - 1], &recs[i])) starts[runs++] = i;
    starts[runs] = n;
    long *order = malloc(runs * sizeof *order);
    for (long i = 0; i < runs; i++) order[i] = i;
    srand(7);
    for (long i = runs - 1; i > 0; i--) {
        long j = rand() % (i + 1), t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    record_t *out = malloc(n * sizeof *out);
    long k = 0;
    for (long i = 0; i < runs; i++)
        for (long j = starts[order[i]]; j < starts[order[i] + 1]; j++) out[k++] = recs[j];
    free(starts);
    free(order);
    free(recs);
    return out;
}

static double cpu_seconds(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_utime.tv_sec + u.ru_stime.tv_sec + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

static rd_kafka_resp_err_t produce(const record_t *r) {
    rd_kafka_vu_t vu[] = {
        {.vtype = RD_KAFKA_VTYPE_RKT, .u.rkt = r->topic},
        {.vtype = RD_KAFKA_VTYPE_VALUE, .u.mem = {(void *)r->value, r->value_len}},
        {.vtype = RD_KAFKA_VTYPE_KEY, .u.mem = {(void *)r->key, r->key_len > 0 ? r->key_len : 0}},
        {.vtype = RD_KAFKA_VTYPE_HEADERS, .u.headers = r->headers ? rd_kafka_headers_copy(r->headers) : NULL},
    };
    /* Without headers the last entry is left out (a NULL list is not accepted). */
    rd_kafka_error_t *e = rd_kafka_produceva(rk_global, vu, r->headers ? 4 : 3);
    if (!e) return RD_KAFKA_RESP_ERR_NO_ERROR;
    rd_kafka_resp_err_t code = rd_kafka_error_code(e);
    rd_kafka_error_destroy(e);
    if (r->headers) rd_kafka_headers_destroy(vu[3].u.headers);
    return code;
}

int main(int argc, char **argv) {
    const char *bootstrap = NULL, *path = NULL;
    double seconds = 0, rate = 0;
    long count = 0;
    const char *usage = "usage: raw_producer -b BOOTSTRAP -f MESSAGES [-s SECONDS] [-n COUNT] [-r RATE] [-H] [-X NAME=VALUE]...";
    const char *extra[64];
    int nextra = 0, no_headers = 0;
    for (int c; (c = getopt(argc, argv, "b:f:s:n:r:HX:")) != -1;) {
        if (c == 'b') bootstrap = optarg;
        else if (c == 'f') path = optarg;
        else if (c == 's') seconds = atof(optarg);
        else if (c == 'n') count = atol(optarg);
        else if (c == 'r') rate = atof(optarg);
        else if (c == 'H') no_headers = 1;
        else if (c == 'X' && nextra < 64) extra[nextra++] = optarg;
        else die(usage);
    }
    if (!bootstrap || !path || rate < 0) die(usage);

    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    set(conf, "bootstrap.servers", bootstrap);
    set(conf, "acks", "all");
    set(conf, "enable.idempotence", "true");
    set(conf, "linger.ms", "5");
    set(conf, "queue.buffering.max.messages", "1000000");
    set(conf, "queue.buffering.max.kbytes", "1048576");
    for (int i = 0; i < nextra; i++) {
        char *kv = strdup(extra[i]), *eq = strchr(kv, '=');
        if (!eq) die("-X takes NAME=VALUE");
        *eq = 0;
        set(conf, kv, eq + 1);
        free(kv);
    }
    rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    char err[512];
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    if (!rk) die(err);
    rk_global = rk;

    long nrecs;
    record_t *recs = load(rk, path, &nrecs);
    if (nrecs == 0) die("no messages in the file");
    if (count == 0 && seconds == 0) count = nrecs;
    if (rate > 0) recs = shuffle_runs(recs, nrecs);
    if (no_headers)
        for (long i = 0; i < nrecs; i++) recs[i].headers = NULL;

    /* Messages point into the file buffer (no copy): it lives until the end. */
    double cpu0 = cpu_seconds(), start = now(), deadline = seconds > 0 ? start + seconds : 1e300;
    long sent = 0;
    while ((count == 0 || sent < count) && ((sent & 1023) || now() < deadline)) {
        if (rate > 0 && sent >= (now() - start) * rate) {
            /* Paced: wait for the next millisecond's messages, serving delivery reports meanwhile. */
            rd_kafka_poll(rk, 0);
            usleep(1000);
            if (now() >= deadline) break;
            continue;
        }
        rd_kafka_resp_err_t e = produce(&recs[sent % nrecs]);
        if (e != RD_KAFKA_RESP_ERR_NO_ERROR) {
            if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL) die(rd_kafka_err2str(e));
            rd_kafka_poll(rk, 1);
            continue;
        }
        sent++;
        if (!(sent & 255)) rd_kafka_poll(rk, 0);
    }
    rd_kafka_flush(rk, 120000);
    double elapsed = now() - start, cpu = cpu_seconds() - cpu0;
    printf("{\"sent\": %ld, \"delivered\": %ld, \"failed\": %ld, \"bytes\": %lld, \"seconds\": %.3f, "
           "\"msgs_per_s\": %.1f, \"mb_per_s\": %.2f, \"distinct_messages\": %ld, \"librdkafka\": \"%s\", "
           "\"cpu_s\": %.3f, \"first_error\": \"%s\"}\n",
           sent, delivered, failed, delivered_bytes, elapsed, delivered / elapsed, delivered_bytes / elapsed / 1e6,
           nrecs, rd_kafka_version_str(), cpu, first_error);
    rd_kafka_destroy(rk);
    return failed ? 2 : 0;
}
