"""prisma_mm.data"""
