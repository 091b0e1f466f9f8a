"""Counting and copying what reached the (mock) cluster, with clients that are not Sluice's code.

Offsets are read with kcat -Q: it is built on Debian's librdkafka 2.0.2, like the mock cluster.
(confluent-kafka's newer bundled librdkafka cannot parse the mock cluster's batched ListOffsets
answers, and asking partition by partition takes seconds for hundreds of partitions.)
"""
import struct
import subprocess
import time

from confluent_kafka import Consumer, TopicPartition


class Cluster:
    def __init__(self, bootstrap, partitions):
        self.bootstrap, self.partitions = bootstrap, partitions
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "sluice-bench",
                                  "enable.auto.commit": False})

    def offsets(self, topics, which):
        """{(topic, partition): offset}, `which` -1 for the high watermark, -2 for the low one."""
        argv = ["kcat", "-Q", "-b", self.bootstrap]
        for t in topics:
            for p in range(self.partitions):
                argv += ["-t", f"{t}:{p}:{which}"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
        result = {}
        for line in out.splitlines():  # "topic [partition] offset N"
            topic, part, _, offset = line.split()
            result[(topic, int(part.strip("[]")))] = int(offset)
        if len(result) != len(topics) * self.partitions:
            raise RuntimeError(f"kcat -Q answered for {len(result)} of {len(topics) * self.partitions} partitions")
        return result

    def delivered(self, topics):
        """Sum of the high watermarks: every message the brokers acknowledged, even those trimmed since."""
        return sum(self.offsets(topics, -1).values())

    def wait_delivered(self, topics, base, expected, slack, timeout, settle=0.5, stall=5.0):
        """Waits until at least `expected - slack` messages past `base` are in and the count has
        stopped moving for `settle` s (or for `stall` s short of that, or `timeout`). `slack` covers
        the requests still in flight when the load stopped, which the server may or may not have
        accepted. Returns (seconds until the last message arrived, messages past base)."""
        start = time.monotonic()
        last, last_change = self.delivered(topics) - base, start
        while True:
            time.sleep(0.1)
            count = self.delivered(topics) - base
            now = time.monotonic()
            if count != last:
                last, last_change = count, now
            quiet = now - last_change
            if (last >= expected - slack and quiet >= settle) or quiet >= stall or now - start >= timeout:
                return last_change - start, last

    def capture(self, topics, path, rename, limit=20000, limit_bytes=256 << 20):
        """Copies up to `limit` messages still held by the brokers (the mock cluster keeps about
        5 MB per partition) into `path` in raw_producer's record format (headers included), with
        topics renamed by `rename`. Returns (messages, average key+value bytes)."""
        lows, ends = self.offsets(topics, -2), self.offsets(topics, -1)
        ends = {tp: high for tp, high in ends.items() if high > lows[tp]}
        assignment = [TopicPartition(t, p, lows[(t, p)]) for t, p in ends]
        count = size = 0
        self.consumer.assign(assignment)
        deadline = time.monotonic() + 60
        with open(path, "wb") as out:
            while ends and count < limit and size < limit_bytes and time.monotonic() < deadline:
                for m in self.consumer.consume(1000, timeout=1):
                    if m.error():
                        continue
                    if (m.topic(), m.partition()) not in ends or m.offset() >= ends[(m.topic(), m.partition())]:
                        continue
                    if m.offset() + 1 >= ends[(m.topic(), m.partition())]:
                        del ends[(m.topic(), m.partition())]
                    topic, key, value = rename(m.topic()).encode(), m.key(), m.value() or b""
                    out.write(struct.pack(">H", len(topic)) + topic)
                    out.write(struct.pack(">i", -1 if key is None else len(key)) + (key or b""))
                    out.write(struct.pack(">I", len(value)) + value)
                    headers = m.headers() or []
                    out.write(struct.pack(">H", len(headers)))
                    for name, hv in headers:
                        name = name.encode()
                        out.write(struct.pack(">H", len(name)) + name)
                        out.write(struct.pack(">i", -1 if hv is None else len(hv)) + (hv or b""))
                    count += 1
                    size += len(value) + len(key or b"")
        self.consumer.unassign()
        return count, (size / count if count else 0.0)

    def close(self):
        self.consumer.close()
