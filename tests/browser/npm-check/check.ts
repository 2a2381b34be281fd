// Type-checked against the packed @seqcast/client by npm-package.test.mjs (`tsc --noEmit`):
// the public API as an application writes it. Lines marked @ts-expect-error must stay errors.

import {
  SeqcastClient,
  SeqcastError,
  SseParser,
  backoffDelay,
  memoryStorage,
  type ConnectionInfo,
  type GapEvent,
  type SeqcastMessage,
  type SubscribedEvent,
  type Transport,
} from '@seqcast/client';

interface Hit {
  title: string;
}

const client = new SeqcastClient({
  url: 'wss://push.example.com/ws',
  token: async () => 'jwt',
  storage: memoryStorage(),
  backoff: { initialMs: 100, maxMs: 10_000 },
  resume: true,
  fallback: { afterFailures: 3, probeMs: 30_000, path: '/events', stallMs: 60_000 },
});
new SeqcastClient({ url: 'ws://127.0.0.1:8080/ws', fallback: false });

const transport: Transport = client.transport;
client.on('transport', (t: Transport, detail: { reason: string }) => console.log(t, detail.reason));
client.on('gap', (gap: GapEvent) => {
  const recovered: false = gap.recovered;
  const via: 'websocket' | 'sse' = gap.transport;
  console.log(recovered, via, gap.reason, gap.since, gap.oldestSequence);
});
client.on('subscribed', (e: SubscribedEvent) => console.log(e.transport, e.recovered));
client.on('error', (e: SeqcastError) => console.log(e.code, e.status, e.subscriptionKey));

const off: () => void = client.subscribe<Hit>('search', 'r1', (m: SeqcastMessage<Hit>, meta) => {
  const title: string = m.data.title;
  console.log(title, m.sequence_number, meta.replayed);
}, { since: 42, epoch: 'e', onGap: (g) => console.log(g.subscriptionKey) });
off();

async function main(): Promise<void> {
  const info: ConnectionInfo = await client.connect();
  const clientId: string | null = info.clientId;
  const ack = await client.publish('search', 'r1', { title: 'x' }, { messageId: 'm-1' });
  const n: number = ack.sequenceNumber + ack.streamSequence;
  const r = await client.recover(0, { channel: 'search', limit: 100 });
  console.log(clientId, n, r.complete, transport, backoffDelay(1));
}
void main();

const parser = new SseParser();
for (const e of parser.push('id: 1\ndata: {}\n\n')) console.log(e.event, e.data, e.id, parser.lastEventId);

// @ts-expect-error: transports are 'websocket' | 'sse'
const wrong: Transport = 'long-poll';
// @ts-expect-error: probeMs is a number
new SeqcastClient({ fallback: { probeMs: '30s' } });
// @ts-expect-error: no such event
client.on('reset', () => {});
console.log(wrong);
