// Quickstart: a machine, a command, a file, streamed output, and cleanup.
// Run against a daemon with a key that has the write and exec scopes:
//   HYPERFLEET_URL=http://127.0.0.1:3000 HYPERFLEET_API_KEY=hf_… node examples/quickstart.mjs
import { Hyperfleet } from "hyperfleet";

const hf = new Hyperfleet(); // reads HYPERFLEET_URL and HYPERFLEET_API_KEY

const m = await hf.machines.create({ name: "quickstart", memSizeMib: 256 }, { start: true });
try {
  const r = await m.exec(["uname", "-sr"]);
  console.log(`exit ${r.exitCode}: ${r.stdout.trim()}`);

  await m.files.write("/root/hello.txt", "hello from the SDK\n");
  console.log(await m.files.readText("/root/hello.txt"));

  const stream = await m.execStream("for i in 1 2 3; do echo tick $i; sleep 0.1; done");
  for await (const chunk of stream) process.stdout.write(chunk.data);
  console.log(`streamed command exited ${(await stream.wait()).exitCode}`);
} finally {
  await m.delete({ force: true });
}
