// Yours: `copier update` never overwrites or deletes this file.
// A dependency-free build: copies src/ into dist/assets/ with content hashes in the file names
// (so nginx can cache them for a year) and points index.html at the hashed names.
import { createHash } from "node:crypto";
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";

rmSync("dist", { recursive: true, force: true });
mkdirSync("dist/assets", { recursive: true });

let html = readFileSync("index.html", "utf8");
for (const name of readdirSync("src")) {
  const body = readFileSync(`src/${name}`);
  const hash = createHash("sha256").update(body).digest("hex").slice(0, 12);
  const hashed = name.replace(/(\.[^.]+)$/, `.${hash}$1`);
  writeFileSync(`dist/assets/${hashed}`, body);
  html = html.replaceAll(`/src/${name}`, `/assets/${hashed}`);
}
writeFileSync("dist/index.html", html);
console.log("built dist/");
