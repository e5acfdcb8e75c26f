// Prints the size of the client as a page loads it: bundled and minified by esbuild, then
// gzipped at the default level. Run `npm run build` first (`npm run size` does).
import { gzipSync } from "node:zlib";
import { build } from "esbuild";

const result = await build({
  entryPoints: ["dist/index.js"],
  bundle: true,
  minify: true,
  format: "esm",
  target: "es2019",
  write: false,
});
const code = result.outputFiles[0].contents;
const gzipped = gzipSync(code).length;
console.log(`minified: ${code.length} bytes, minified and gzipped: ${gzipped} bytes`);
