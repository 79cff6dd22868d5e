// Driven by scripts/screenshots: takes the README's TensorBoard pictures in headless Chromium.
//   node screenshots.js PLAYWRIGHT_CORE_DIR TENSORBOARD_URL OUT_DIR FAILED_DIR CHROMIUM
// Every picture is one TensorBoard view at a 1400x900 viewport, filtered to what it is about (tag and run
// filters in the URL), taken once its content has rendered (chart paths drawn, images decoded, the projector's
// points counted, the HParams rows listed), cropped to that content. A picture whose content does not appear
// within 60 s is not written: the script fails naming it, with a full-page shot of what was there in FAILED_DIR.
// ONLY=name,name takes only those pictures.
'use strict';
const [playwrightDir, base, outDir, failedDir, chromiumPath] = process.argv.slice(2);
const { chromium } = require(playwrightDir);
const path = require('path');

const VIEWPORT = { width: 1400, height: 900 };
const TIMEOUT = 60000;
// The Time Series cards that match the filter (the collapsed groups below hold empty card-views of their own).
const CARD = 'metrics-filtered-view-component card-view';
// The Images tab's pane of what the tag filter matched (the first; the tag groups below repeat its images).
const IMAGES_RESULTS = 'tf-category-paginated-view';

// Headless Chromium has no GPU: SwiftShader (software WebGL, shipped with Debian's chromium) lets the projector
// draw; the Time Series line charts still need forceSVG=true (their WebGL renderer stays blank there).
const CHROMIUM_ARGS = ['--use-angle=swiftshader', '--enable-unsafe-swiftshader', '--ignore-gpu-blocklist'];

// TensorBoard's settings as it keeps them in local storage, set before its page loads: the Time Series settings
// pane closed, no smoothing (24 points a run: the raw curve is the honest one), no outlier clipping (the
// warm-up's first values stay in view), no step selector (its table is cut off at 4 runs; the run list beside
// the cards is the legend), cards wide enough for two a row.
const SETTINGS = {
  timeSeriesSettingsPaneOpened: false,
  scalarSmoothing: 0,
  ignoreOutliers: false,
  stepSelectorEnabled: false,
  timeSeriesCardMinWidth: 520,
};

const log = (...a) => console.error('screenshots:', ...a);

// The box from the page's top-left corner (TensorBoard's header, the run list with its colours) to the right and
// bottom edges of the elements matching `selector` (across shadow roots) that show something (a size, and text
// if `withText`), only the first of them if `first`, grown by `pad`.
async function clipTo(page, selector, { pad = 12, first = false, withText = false } = {}) {
  const box = await page.evaluate(
    ({ selector, first, withText }) => {
      let shown = window
        .__roots()
        .flatMap((r) => Array.from(r.querySelectorAll(selector)))
        .filter((e) => !withText || e.textContent.trim())
        .map((e) => e.getBoundingClientRect())
        .filter((r) => r.width > 0 && r.height > 0);
      if (first) shown = shown.slice(0, 1);
      if (!shown.length) return null;
      return { right: Math.max(...shown.map((r) => r.right)), bottom: Math.max(...shown.map((r) => r.bottom)) };
    },
    { selector, first, withText },
  );
  if (!box) throw new Error(`nothing on the page matches ${selector}`);
  return {
    x: 0,
    y: 0,
    width: Math.min(VIEWPORT.width, Math.ceil(box.right + pad)),
    height: Math.min(VIEWPORT.height, Math.ceil(box.bottom + pad)),
  };
}

async function shoot(page, name, clip) {
  await page.mouse.move(VIEWPORT.width - 1, VIEWPORT.height - 1); // no hover tooltip in the picture
  await page.waitForTimeout(300);
  const file = path.join(outDir, `tensorboard-${name}.png`);
  await page.screenshot({ path: file, clip });
  log(`wrote ${file} (${clip.width}x${clip.height})`);
}

// Time Series filtered by tag and run regexes: waits until exactly `cards` cards match and each has drawn (an
// SVG path with data in a line chart or histogram, every image decoded).
async function timeseries(page, { tags, runs = '', cards }) {
  const q = new URLSearchParams({ forceSVG: 'true', tagFilter: tags });
  if (runs) q.set('runFilter', runs);
  await page.goto(`${base}/?${q}#timeseries`);
  await page.waitForFunction(
    ({ n, selector }) => {
      const all = Array.from(document.querySelectorAll(selector)).filter((c) => c.getBoundingClientRect().width > 0);
      if (all.length !== n) return false;
      return all.every((card) => {
        if (card.querySelector('mat-spinner, mat-progress-spinner, mat-progress-bar')) return false;
        if (card.querySelector('image-card')) {
          const imgs = Array.from(card.querySelectorAll('img'));
          return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0);
        }
        return Array.from(card.querySelectorAll('svg path')).some((p) => (p.getAttribute('d') || '').length > 40);
      });
    },
    { n: cards, selector: CARD },
    { timeout: TIMEOUT },
  );
  await page.waitForTimeout(800); // the charts' transitions
}

// A line chart card's menu: "Toggle Y-axis log scale".
async function logScale(page, tag) {
  const card = page.locator(CARD, { has: page.locator(`[title="${tag}"]`) });
  await card.locator('button[aria-label="More line chart options"]').click();
  await page.locator('button[role="menuitem"]', { hasText: /log scale/i }).click();
  await page.waitForTimeout(800);
}

// The (legacy) Images tab at actual image size: the Time Series image cards have a fixed height and cut off a
// 596x630 confusion matrix. Waits for `count` decoded images.
async function images(page, { tags, runs, count }) {
  const hash = new URLSearchParams({ regexInput: runs, tagFilter: tags });
  await page.goto(`${base}/#images&${hash}`);
  // A setting of the tab's own, kept in local storage: check it only if it is not yet.
  const actual = page.locator('paper-checkbox', { hasText: 'Show actual image size' });
  if ((await actual.getAttribute('aria-checked')) !== 'true') await actual.click();
  await page.waitForFunction(
    (n) => {
      const imgs = window
        .__roots()
        .filter((r) => r.host && r.host.tagName === 'TF-IMAGE-LOADER')
        .flatMap((r) => Array.from(r.querySelectorAll('img')));
      const shown = imgs.filter((i) => i.getBoundingClientRect().width > 0);
      return shown.length >= n && shown.every((i) => i.complete && i.naturalWidth > 0);
    },
    count,
    { timeout: TIMEOUT },
  );
  await page.waitForTimeout(500);
}

// The Images tab's results pane, as wide as its images.
async function imagesClip(page) {
  const pane = await clipTo(page, IMAGES_RESULTS, { first: true, pad: 0 });
  const loaders = await clipTo(page, 'tf-image-loader', { pad: 16 });
  return { ...pane, width: loaders.width };
}

// The HParams table with only the columns that tell the runs apart (TensorBoard checks the first five
// hyperparameters alphabetically: backbone, batch_size, bf16, data, epochs, which here are nearly all equal).
async function hparams(page, { columns, rows }) {
  await page.goto(`${base}/#hparams`);
  await page.locator('paper-checkbox', { hasText: /^\s*backbone\s*$/ }).waitFor({ timeout: TIMEOUT });
  await page.waitForTimeout(1000);
  const statuses = new Set(['Unknown', 'Success', 'Failure', 'Running']);
  const want = new Set(columns);
  for (const box of await page.locator('paper-checkbox').all()) {
    const name = (await box.innerText()).trim();
    if (!name || statuses.has(name)) continue;
    if (((await box.getAttribute('aria-checked')) === 'true') !== want.has(name)) await box.click();
  }
  // Each run is a row (its name is the trial ID): wait for all of them.
  await page.waitForFunction(
    ({ rows }) => {
      const text = window.__roots().map((r) => r.textContent).join(' ');
      return rows.every((r) => text.includes(r));
    },
    { rows },
    { timeout: TIMEOUT },
  );
  await page.waitForTimeout(1000);
  // Clicking the checkboxes scrolled the left pane: back to its top.
  await page.evaluate(() => {
    for (const r of window.__roots()) for (const e of r.querySelectorAll('*')) if (e.scrollTop > 0) e.scrollTop = 0;
  });
}

const pictures = {
  // Each objective's loss terms (one card each: their scales differ) and the learning rate (log scale: LARS at
  // 0.1-0.5 beside AdamW at 1e-4).
  async scalars(page) {
    await timeseries(page, { tags: '^train/(loss/.+|lr)$', cards: 4 });
    await logScale(page, 'train/lr');
    await shoot(page, 'scalars', await clipTo(page, CARD));
  },
  // The validation curve: a k-NN top-1 after every epoch, every run.
  async knn(page) {
    await timeseries(page, { tags: '^val/knn_top1$', cards: 1 });
    await shoot(page, 'knn', await clipTo(page, CARD));
  },
  // What the objectives train on: SimCLR's pairs of augmented views, MAE's single views.
  async views(page) {
    await images(page, { tags: '^views/', runs: '^(simclr-t0\\.2|mae)$', count: 2 });
    await shoot(page, 'views', await imagesClip(page));
  },
  // MAE's reconstructions at the end of training: originals, what the encoder saw, the reconstruction.
  async reconstruction(page) {
    await images(page, { tags: '^reconstruction/', runs: '^mae$', count: 1 });
    await shoot(page, 'reconstruction', await imagesClip(page));
  },
  // The linear probe's confusion matrix on the test set.
  async confusion(page) {
    await images(page, { tags: '^eval/linear_confusion_matrix$', runs: '^simclr-t0\\.2$', count: 1 });
    await shoot(page, 'confusion', await imagesClip(page));
  },
  // Weight and gradient histograms over training, and the per-parameter gradient norms.
  async histograms(page) {
    await timeseries(page, {
      tags: '^(weights|gradients)/backbone\\.layer4\\.0\\.conv2\\.weight$|^grad_norm/per_parameter$',
      runs: '^simclr-t0\\.2$',
      cards: 3,
    });
    await shoot(page, 'histograms', await clipTo(page, CARD));
  },
  // The Text tab: the evaluation report, per class, as Markdown.
  async text(page) {
    const hash = new URLSearchParams({ regexInput: '^simclr-t0\\.2$', tagFilter: '^eval/report$' });
    await page.goto(`${base}/#text&${hash}`);
    await page.waitForFunction(
      () =>
        window
          .__roots()
          .some((r) => Array.from(r.querySelectorAll('table')).some((t) => t.textContent.includes('linear probe'))),
      null,
      { timeout: TIMEOUT },
    );
    await page.waitForTimeout(500);
    await shoot(page, 'text', await clipTo(page, IMAGES_RESULTS, { first: true, pad: 0 }));
  },
  // The runs side by side: what differs between them and how they scored.
  async hparams(page) {
    await hparams(page, {
      columns: ['objective', 'lr', 'temperature', 'k-NN top-1', 'linear top-1'],
      rows: ['simclr-t0.2', 'simclr-t0.5', 'byol', 'mae'],
    });
    await shoot(page, 'hparams', await clipTo(page, 'vaadin-grid-cell-content', { withText: true, pad: 16 }));
  },
  // The learned space: the backbone's features of 1,000 test images in 3-D PCA, each point its image, coloured
  // by class.
  async projector(page) {
    await page.goto(`${base}/#projector`);
    let frame;
    for (let waited = 0; !frame; waited += 500) {
      frame = page.frames().find((f) => /projector_binary/.test(f.url()));
      if (waited > TIMEOUT) throw new Error('the projector frame did not load');
      if (!frame) await page.waitForTimeout(500);
    }
    await frame.locator('text=/Points: *1000/').waitFor({ timeout: TIMEOUT });
    const run = frame.locator('paper-dropdown-menu').first();
    if (!/simclr-t0\.2/.test(await run.innerText())) {
      await run.click();
      await frame.locator('paper-item', { hasText: /^\s*simclr-t0\.2\s*$/ }).click();
      await frame.locator('text=/Points: *1000/').waitFor({ timeout: TIMEOUT });
    }
    await frame.locator('paper-dropdown-menu#colorby').click();
    await frame.locator('paper-dropdown-menu#colorby paper-item', { hasText: /^\s*class/ }).first().click();
    await frame.locator('text=/Total variance described/').waitFor({ timeout: TIMEOUT });
    await page.waitForTimeout(3000); // the sprites' texture and the colours
    await shoot(page, 'projector', { x: 0, y: 0, width: 1090, height: VIEWPORT.height });
  },
};

(async () => {
  const browser = await chromium.launch({ executablePath: chromiumPath, args: CHROMIUM_ARGS });
  const failed = [];
  try {
    const context = await browser.newContext({ viewport: VIEWPORT, deviceScaleFactor: 1 });
    await context.addInitScript((settings) => {
      localStorage.setItem('_tb_global_settings', JSON.stringify(settings));
      // The document and every open shadow root below it (TensorBoard's Polymer tabs live in shadow roots).
      window.__roots = () => {
        const roots = [document];
        for (let i = 0; i < roots.length; i++) {
          for (const e of roots[i].querySelectorAll('*')) if (e.shadowRoot) roots.push(e.shadowRoot);
        }
        return roots;
      };
    }, SETTINGS);
    const page = await context.newPage();
    page.setDefaultTimeout(TIMEOUT);
    const only = (process.env.ONLY || '').split(',').filter(Boolean);
    for (const [name, take] of Object.entries(pictures)) {
      if (only.length && !only.includes(name)) continue;
      try {
        await take(page);
      } catch (e) {
        failed.push(name);
        const shot = path.join(failedDir, `failed-${name}.png`);
        await page.screenshot({ path: shot }).catch(() => {});
        log(`${name}: ${e.message.split('\n')[0]} (the page as it was: ${shot})`);
      }
    }
  } finally {
    await browser.close();
  }
  if (failed.length) {
    log(`failed: ${failed.join(', ')}`);
    process.exit(1);
  }
})();
